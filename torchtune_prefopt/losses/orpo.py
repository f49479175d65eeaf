"""ORPO (Odds Ratio Preference Optimization, reference-free)."""

from __future__ import annotations

import math

import torch

from ._base import PairwiseLoss, _positive

__all__ = ["ORPOLoss", "log1mexp"]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    r"""``log(1 − e^x)`` for ``x < 0``, without cancellation (Mächler 2012): ``log(−expm1(x))``
    for ``x > −ln 2``, ``log1p(−e^x)`` below."""
    near_zero = x > -math.log(2.0)
    # each branch sees only inputs it is exact (and differentiable) at: torch.where's backward
    # multiplies the unused branch's gradient by 0, and 0 * inf would be nan (log1p(-e^x) at
    # x = -1e-9 in fp32: e^x rounds to 1)
    safe = torch.full_like(x, -1.0)
    return torch.where(
        near_zero,
        torch.log(-torch.expm1(torch.where(near_zero, x, safe))),
        torch.log1p(-torch.exp(torch.where(near_zero, safe, x))),
    )


class ORPOLoss(PairwiseLoss):
    r"""ORPO, Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without
    Reference Model" (arXiv 2403.07691), Eqs. 4–7 (TRL's ``ORPOTrainer``).

    With the per-token mean log-probs ``m = \overline{\log\pi}(y)`` (so ``p = e^m`` is the
    geometric-mean token probability) and ``odds(y) = p / (1 − p)``:

    .. math::
        \log\mathrm{OR} = \log\frac{odds(y_w)}{odds(y_l)}
            = (m_w - m_l) - \big(\log(1 - e^{m_w}) - \log(1 - e^{m_l})\big),\qquad
        \ell = \mathrm{NLL}(y_w) - \lambda\,\log\sigma(\log\mathrm{OR})

    ``NLL(y_w)`` is the SFT term of :class:`PairwiseLoss` with weight ``sft_weight`` (1 here:
    the chosen tokens' NLL averaged over the global batch's chosen tokens). ``log(1 − e^m)``
    is :func:`log1mexp`, exact for every ``m < 0`` (no cancellation, so no clamp is needed
    below 0): a near-certain answer keeps the equation's value and gradient. Only where
    ``log(1 − e^m)`` is ``-inf`` (``m = 0``, or ``m`` above the dtype's smallest normal
    number, ``-finfo.tiny``: every token of the answer certain) is ``m`` moved to
    ``-finfo.tiny``, so the odds ratio stays finite.

    The NLL is on the completion tokens, as the paper's equation has it; TRL's ORPO trainer
    (and the ORPO authors' code) also put it on the prompt tokens (trl #1516, #2527). On rows
    whose prompt is one token the two agree, and there the steps equal TRL's
    (``tests/test_trl_equality.py``).

    Args:
        lambda_ (float): λ > 0, the odds-ratio weight (the paper's λ, TRL's ``beta``; 0.1 by
            default, the paper uses 0.1–0.25).
        sft_weight (float): weight of the NLL term (1.0: the paper).

    Attributes: ``reference_free=True`` (no reference model), ``average_logps=True``,
    ``paired=True``. Logged rewards: ``λ·m_w``, ``λ·m_l`` (TRL's), detached.
    """

    reference_free = True
    average_logps = True
    _hparams = ("lambda_", "sft_weight")

    def __init__(self, lambda_: float = 0.1, sft_weight: float = 1.0):
        super().__init__()
        self.lambda_ = _positive("lambda_", lambda_)
        self._set_sft_weight(sft_weight)

    def reward_scale(self) -> float:
        return self.lambda_

    @staticmethod
    def log_odds_ratio(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        """``log OR`` of per-token mean log-probs ``[B]`` (in fp32 at least)."""
        dtype = torch.promote_types(chosen.dtype, torch.float32)
        top = -torch.finfo(dtype).tiny  # log1mexp is finite and exact below it
        mw = chosen.to(dtype).clamp(max=top)
        ml = rejected.to(dtype).clamp(max=top)
        return (mw - ml) - (log1mexp(mw) - log1mexp(ml))

    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return -self.lambda_ * torch.nn.functional.logsigmoid(self.log_odds_ratio(chosen, rejected))
