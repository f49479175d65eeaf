"""SimPO (Simple Preference Optimization, reference-free)."""

from __future__ import annotations

import torch

from ._base import (
    PairwiseLoss,
    _conservative_logistic,
    _label_smoothing,
    _non_negative,
    _positive,
)

__all__ = ["SimPOLoss"]


class SimPOLoss(PairwiseLoss):
    r"""SimPO, Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward" (arXiv 2405.14734).

    The implicit reward is the length-normalised policy log-likelihood, ``β·avg`` where
    ``avg = (1/|y|) Σ_t log π(y_t | x, y_<t)``; with a target reward margin γ:

    .. math::
        z = \beta\,\overline{\log\pi}(y_c) - \beta\,\overline{\log\pi}(y_r) - \gamma,\qquad
        \ell = -(1-\varepsilon)\,\log\sigma(z) - \varepsilon\,\log\sigma(-z).

    ``ε = 0`` is the paper's Eq. 6. γ is the paper's *absolute* margin in reward units
    (the authors' later code takes ``gamma_beta_ratio = γ/β`` instead: convert with
    ``γ = β · gamma_beta_ratio``). At ``β·Δavg = γ`` the loss (ε = 0) is ``log 2``. ``sft_weight > 0``
    adds the SFT term (CPO-SimPO).

    Args:
        beta (float): β > 0, reward scale. The paper uses 2.0–2.5 (later releases up to 10
            for some instruct models) — much larger than DPO's β.
        gamma (float): γ ≥ 0, target reward margin. The paper's settings are roughly
            0.3–1.6 (γ/β ≈ 0.15–0.8).
        label_smoothing (float): ε in [0, 0.5), conservative smoothing as in cDPO. Default 0.
        sft_weight (float): ≥ 0, weight of the SFT term on the chosen completion (the
            global token-mean NLL, see :class:`PairwiseLoss`); 0 (off) by default.

    Attributes: ``reference_free=True`` (no reference model is loaded), ``average_logps=True``
    (inputs are per-token means), ``paired=True``.

    ``forward`` arguments: policy_chosen_logps ``[B]``, policy_rejected_logps ``[B]`` (float,
    per-token mean log-probs of each completion); reference_chosen_logps,
    reference_rejected_logps: accepted for drop-in compatibility with DPO recipes and
    ignored (may be None).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` without reduction; rewards
        are detached ``β·avg(y_c)`` and ``β·avg(y_r)``.
    """

    reference_free = True
    average_logps = True
    paired = True
    _hparams = ("beta", "gamma", "label_smoothing", "sft_weight")

    def __init__(
        self,
        beta: float = 2.0,
        gamma: float = 1.0,
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
    ):
        super().__init__()
        self._set_sft_weight(sft_weight)
        self.beta = _positive("beta", beta)
        self.gamma = _non_negative("gamma", gamma)
        self.label_smoothing = _label_smoothing("label_smoothing", label_smoothing)

    def reward_scale(self) -> float:
        return self.beta

    def margin_loss(self, h: torch.Tensor) -> torch.Tensor:
        # h = avg(y_c) - avg(y_r): the reference-free "log-ratios" are the policy's means
        return _conservative_logistic(self.beta * h - self.gamma, self.label_smoothing)
