"""DPO (with the conservative / label-smoothed variant) and robust DPO."""

from __future__ import annotations

import torch

from ._base import PairwiseLoss, _conservative_logistic, _label_smoothing, _positive

__all__ = ["DPOLoss", "RobustDPOLoss"]


class DPOLoss(PairwiseLoss):
    r"""Direct Preference Optimization, Rafailov et al. 2023 (arXiv 2305.18290), with the
    conservative-DPO label smoothing of Mitchell 2023 ("A note on DPO with noisy
    preferences & relationship to IPO").

    With summed completion log-probs and the implicit log-ratio margin

    .. math::
        h = (\log\pi(y_c) - \log\pi_{ref}(y_c)) - (\log\pi(y_r) - \log\pi_{ref}(y_r)),

    the per-example loss is

    .. math::
        \ell = -(1-\varepsilon)\,\log\sigma(\beta h) - \varepsilon\,\log\sigma(-\beta h).

    ``ε = 0`` is the paper's Eq. 7. A drop-in replacement for ``torchtune.rlhf.loss.DPOLoss``
    (same constructor and ``forward`` signature, same outputs).

    Args:
        beta (float): β > 0, the KL-penalty strength (inverse temperature). Typical 0.1
            (range 0.01–0.5; smaller lets the policy move further from the reference).
        label_smoothing (float): ε in [0, 0.5), the assumed probability that a preference
            label is flipped. 0 (off) by default; cDPO uses small values such as 0.1.

    Attributes: ``reference_free=False``, ``average_logps=False`` (summed log-probs),
    ``paired=True``.

    ``forward`` arguments (all 1-D, shape ``[B]``, float; summed log-probs over completion
    tokens):
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps. The reference tensors are required (``ValueError`` if None).

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` without reduction. Logged
        rewards are the detached implicit rewards ``β·(log π(y_c) − log π_ref(y_c))`` and
        ``β·(log π(y_r) − log π_ref(y_r))``; their difference is ``β·h``.
    """

    reference_free = False
    average_logps = False
    paired = True
    _hparams = ("beta", "label_smoothing")

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        super().__init__()
        self.beta = _positive("beta", beta)
        self.label_smoothing = _label_smoothing("label_smoothing", label_smoothing)

    def reward_scale(self) -> float:
        return self.beta

    def margin_loss(self, h: torch.Tensor) -> torch.Tensor:
        return _conservative_logistic(self.beta * h, self.label_smoothing)


class RobustDPOLoss(DPOLoss):
    r"""Robust DPO (rDPO), Chowdhury, Kini & Natarajan 2024, "Provably Robust DPO: Aligning
    Language Models with Noisy Feedback" (arXiv 2403.00409).

    With ``h`` the DPO log-ratio margin on summed log-probs (see :class:`DPOLoss`) and ε the
    known label-flip rate, the per-example loss is the *unbiased* de-noised DPO loss

    .. math::
        \ell = \frac{-(1-\varepsilon)\,\log\sigma(\beta h) + \varepsilon\,\log\sigma(-\beta h)}
                    {1 - 2\varepsilon}.

    Unlike cDPO (:class:`DPOLoss` with label smoothing) the ε term has a *plus* sign and the
    whole is rescaled, so that its expectation under flipped labels equals the clean DPO
    loss. It can be negative for large ``βh`` when ε > 0. ``ε = 0`` is plain DPO.

    Args:
        beta (float): β > 0, as in DPO (typical 0.1, range 0.01–0.5).
        label_smoothing (float): ε in [0, 0.5), the assumed preference-flip rate (the name
            TRL uses for the same quantity). Set it to the estimated flip rate of the data
            (e.g. 0.1–0.3 for noisy labels); the loss's variance grows as ε → 0.5.

    Attributes, ``forward`` arguments, shapes and the logged rewards are exactly those of
    :class:`DPOLoss` (rewards ``β·(log π − log π_ref)``, detached).
    """

    def margin_loss(self, h: torch.Tensor) -> torch.Tensor:
        eps = self.label_smoothing
        z = self.beta * h
        logsig = torch.nn.functional.logsigmoid
        return (-(1.0 - eps) * logsig(z) + eps * logsig(-z)) / (1.0 - 2.0 * eps)
