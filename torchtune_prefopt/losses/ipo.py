"""IPO (Identity Preference Optimisation)."""

from __future__ import annotations

import torch

from ._base import PairwiseLoss, _bool, _positive

__all__ = ["IPOLoss"]


class IPOLoss(PairwiseLoss):
    r"""Identity Preference Optimisation, Azar et al. 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences" (arXiv 2310.12036).

    With the log-ratio margin

    .. math::
        h = (\log\pi(y_c) - \log\pi_{ref}(y_c)) - (\log\pi(y_r) - \log\pi_{ref}(y_r)),

    the per-example loss is the squared regression of ``h`` onto the target ``1/(2τ)``:

    .. math::
        \ell = \left(h - \frac{1}{2\tau}\right)^2 .

    Its unique optimum (zero loss, zero gradient) is at ``h = 1/(2τ)``: unlike DPO it never
    pushes the margin to infinity, which is IPO's guard against over-fitting deterministic
    preferences.

    Args:
        tau (float): τ > 0, the regularisation strength (smaller τ → larger target margin,
            weaker pull to the reference). TRL's default is 0.1; useful values are roughly
            0.01–1.0 and depend on ``average_logps`` (with per-token means ``h`` is O(1), with
            sums it grows with the completion length, so a smaller τ is needed).
        average_logps (bool): True (default): every log-prob input is the per-token *mean*
            over its completion, which is what the IPO authors' experiments used (and TRL's
            ``loss_type="ipo"``). False: summed log-probs, the paper's Eq. 17 literally. The
            equation is the same; this only tells the recipe which log-probs to pass.
        sft_weight (float): ≥ 0, weight of the SFT term on the chosen completion (the
            global token-mean NLL, see :class:`PairwiseLoss`); 0 (off) by default.

    Attributes: ``reference_free=False``, ``average_logps`` as given, ``paired=True``.

    ``forward`` arguments (all 1-D, shape ``[B]``, float; per-token means or sums according to
    ``average_logps``): policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
    reference_rejected_logps. References are required (``ValueError`` if None).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` without reduction; rewards
        are detached ``τ·(log π(y_c) − log π_ref(y_c))`` and ``τ·(log π(y_r) − log
        π_ref(y_r))`` on the same (mean or summed) log-probs that enter the loss.
    """

    reference_free = False
    average_logps = True
    paired = True
    _hparams = ("tau", "average_logps", "sft_weight")

    def __init__(self, tau: float = 0.1, average_logps: bool = True, sft_weight: float = 0.0):
        super().__init__()
        self._set_sft_weight(sft_weight)
        self.tau = _positive("tau", tau)
        self.average_logps = _bool("average_logps", average_logps)

    def reward_scale(self) -> float:
        return self.tau

    def margin_loss(self, h: torch.Tensor) -> torch.Tensor:
        return (h - 1.0 / (2.0 * self.tau)) ** 2
