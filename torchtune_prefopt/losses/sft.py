"""The SFT term alone: the negative log-likelihood of the chosen completion."""

from __future__ import annotations

import torch

from ._base import PairwiseLoss, _positive

__all__ = ["SFTLoss"]


class SFTLoss(PairwiseLoss):
    r"""Supervised fine-tuning on the chosen completions of preference pairs, as a loss or as
    a term of :class:`~torchtune_prefopt.losses.WeightedSum` (``loss: sft``; TRL's
    ``loss_type="sft"``):

    .. math::
        \mathcal{L} = -\frac{\sum_{pairs}\sum_t \log\pi(y_{w,t})}{\sum_{pairs} |y_w|}

    over every chosen token of the optimizer step's global batch (per pair: :func:`chosen_nll`
    times ``weight``). Reference-free; the rejected completions get no gradient. Logged
    rewards: the per-token mean log-probs ``\overline{\log\pi}(y)`` (detached).

    Args:
        weight (float): > 0, the term's weight (1.0).
    """

    reference_free = True
    average_logps = True
    _hparams = ("sft_weight",)

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self._set_sft_weight(_positive("weight", weight))

    def reward_scale(self) -> float:
        return 1.0

    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(chosen)
