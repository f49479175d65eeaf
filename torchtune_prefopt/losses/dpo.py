"""DPO (with the conservative / label-smoothed variant) and robust DPO."""

from __future__ import annotations

import torch

from ._base import PairwiseLoss, _conservative_logistic, _label_smoothing, _non_negative, _positive

__all__ = ["DPOLoss", "DPONormLoss", "DPOPLoss", "RobustDPOLoss"]


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
        sft_weight (float): ≥ 0, weight of the SFT term on the chosen completion (the
            global token-mean NLL, see :class:`PairwiseLoss`); 0 (off) by default.

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
    _hparams = ("beta", "label_smoothing", "sft_weight")

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, sft_weight: float = 0.0):
        super().__init__()
        self._set_sft_weight(sft_weight)
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


class DPONormLoss(DPOLoss):
    r"""Length-normalised DPO: DPO on per-token *mean* log-ratios (Tülu 3, Lambert et al.
    2024, arXiv 2411.15124; TRL ``loss_type="sigmoid_norm"``).

    .. math::
        h = \Big(\overline{\log\pi}(y_w) - \overline{\log\pi_{ref}}(y_w)\Big)
          - \Big(\overline{\log\pi}(y_l) - \overline{\log\pi_{ref}}(y_l)\Big),\qquad
        \ell = -\log\sigma(\beta h)

    with ``\overline{\log\pi}(y) = \frac{1}{|y|}\sum_t \log\pi(y_t)`` (label smoothing as in
    :class:`DPOLoss`). A per-token ``h`` is ~|y| times smaller than DPO's, so β must be much
    larger: Tülu 3 / OLMo use β = 5 (the default here); keep β ≥ 5.

    Args: as :class:`DPOLoss` (``beta`` default 5.0). Attributes: ``average_logps=True``.
    """

    average_logps = True

    def __init__(self, beta: float = 5.0, label_smoothing: float = 0.0, sft_weight: float = 0.0):
        super().__init__(beta=beta, label_smoothing=label_smoothing, sft_weight=sft_weight)


class DPOPLoss(DPOLoss):
    r"""DPO-Positive (DPOP), Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference
    Optimisation with DPO-Positive" (arXiv 2402.13228), Eq. 3.

    DPO can lower the chosen completion's likelihood while widening the margin (likelihood
    displacement); DPOP penalises the chosen log-ratio falling below 0 inside the sigmoid:

    .. math::
        \ell = -\log\sigma\Big(\beta\big(h - \lambda\,\max(0,\ \log\pi_{ref}(y_w) - \log\pi(y_w))\big)\Big)

    with ``h`` DPO's summed log-ratio margin. ``λ = 0`` is DPO.

    Args:
        beta (float): β > 0, as DPO (default 0.1).
        lambda_ (float): λ ≥ 0, the penalty weight (the paper uses 50; config key ``lambda_``).
        sft_weight (float): as :class:`DPOLoss`.
    """

    _hparams = ("beta", "lambda_", "sft_weight")

    def __init__(self, beta: float = 0.1, lambda_: float = 50.0, sft_weight: float = 0.0):
        super().__init__(beta=beta, sft_weight=sft_weight)
        self.lambda_ = _non_negative("lambda_", lambda_)

    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        penalty = torch.relu(-chosen)  # max(0, log π_ref(y_w) − log π(y_w))
        return -torch.nn.functional.logsigmoid(
            self.beta * (chosen - rejected - self.lambda_ * penalty)
        )
