"""Hinge loss of RSO / SLiC-style calibration."""

from __future__ import annotations

import torch

from ._base import PairwiseLoss, _positive

__all__ = ["HingeLoss"]


class HingeLoss(PairwiseLoss):
    r"""Hinge preference loss of RSO, Liu et al. 2023, "Statistical Rejection Sampling Improves
    Preference Optimization" (arXiv 2309.06657) — the SVM counterpart of DPO (SLiC with the
    reference-normalised likelihood).

    With the DPO log-ratio margin on summed log-probs

    .. math::
        h = (\log\pi(y_c) - \log\pi_{ref}(y_c)) - (\log\pi(y_r) - \log\pi_{ref}(y_r)),

    the per-example loss is

    .. math::
        \ell = \max(0,\; 1 - \beta h).

    It is zero (and has zero gradient) once ``h ≥ 1/β``. Same as
    ``torchtune.rlhf.loss.RSOLoss(gamma=β)``; registered as ``hinge`` and ``rso``.

    Args:
        beta (float): β > 0, scale of the margin (the paper's γ); the hinge is satisfied at
            ``h = 1/β``. Typical 0.1 (range 0.05–0.5; TRL's default for ``hinge`` is 0.1).
        sft_weight (float): ≥ 0, weight of the SFT term on the chosen completion (the
            global token-mean NLL, see :class:`PairwiseLoss`); 0 (off) by default.

    Attributes: ``reference_free=False``, ``average_logps=False``, ``paired=True``.

    ``forward`` arguments (all 1-D, shape ``[B]``, float; summed log-probs):
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps. References are required (``ValueError`` if None).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` without reduction; rewards
        are detached ``β·(log π(y_c) − log π_ref(y_c))`` and ``β·(log π(y_r) − log π_ref(y_r))``.
    """

    reference_free = False
    average_logps = False
    paired = True
    _hparams = ("beta", "sft_weight")

    def __init__(self, beta: float = 0.1, sft_weight: float = 0.0):
        super().__init__()
        self._set_sft_weight(sft_weight)
        self.beta = _positive("beta", beta)

    def reward_scale(self) -> float:
        return self.beta

    def margin_loss(self, h: torch.Tensor) -> torch.Tensor:
        return torch.relu(1.0 - self.beta * h)
