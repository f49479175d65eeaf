"""APO-zero (Anchored Preference Optimization)."""

from __future__ import annotations

import torch

from ._base import PairwiseLoss, _positive

__all__ = ["APOZeroLoss"]


class APOZeroLoss(PairwiseLoss):
    r"""APO-zero, D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions" (arXiv 2408.06266), Eq. 7 (TRL ``loss_type="apo_zero"``).

    With the summed log-ratios ``r_w``, ``r_l`` (see :class:`PairwiseLoss`):

    .. math::
        \ell = 1 - \sigma(\beta\,r_w) + \sigma(\beta\,r_l)

    It anchors each completion to the reference on its own: the chosen likelihood is pushed up
    and the rejected one down (use it when the chosen answers are better than the model's own;
    plain DPO only widens the margin, and can lower both).

    Args:
        beta (float): β > 0 (default 0.1).
        sft_weight (float): ≥ 0, weight of the SFT term (see :class:`PairwiseLoss`); 0 by default.

    Attributes: ``reference_free=False``, ``average_logps=False``, ``paired=True``; rewards
    ``β·r_w``, ``β·r_l`` (detached).
    """

    reference_free = False
    average_logps = False
    _hparams = ("beta", "sft_weight")

    def __init__(self, beta: float = 0.1, sft_weight: float = 0.0):
        super().__init__()
        self.beta = _positive("beta", beta)
        self._set_sft_weight(sft_weight)

    def reward_scale(self) -> float:
        return self.beta

    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.sigmoid(self.beta * chosen) + torch.sigmoid(self.beta * rejected)
