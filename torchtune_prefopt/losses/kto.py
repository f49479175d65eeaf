"""KTO (Kahneman-Tversky Optimization) for unpaired desirable/undesirable rows."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ._base import PreferenceLoss, _check_same_shape, _positive

__all__ = ["KTOLoss"]


class KTOLoss(PreferenceLoss):
    r"""KTO, Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
    (arXiv 2402.01306).

    Each row is one completion labelled desirable or undesirable (no pairs). With the summed
    log-ratio ``r = log π(y|x) − log π_ref(y|x)`` and the reference point

    .. math::
        z_0 = \max\Big(0,\ \frac{1}{K}\sum_{k=1}^{K}
              \big(\log\pi(y'_k|x_k) - \log\pi_{ref}(y'_k|x_k)\big)\Big)

    estimated on *mismatched* pairs (prompt ``x_k`` with another row's completion ``y'_k``),
    the per-example loss is

    .. math::
        \ell = \begin{cases}
            \lambda_D\,\big(1 - \sigma(\beta(r - z_0))\big) & \text{desirable}\\
            \lambda_U\,\big(1 - \sigma(\beta(z_0 - r))\big) & \text{undesirable.}
        \end{cases}

    ``z_0`` is detached (no gradient flows into the KL inputs) and clamped at 0. When
    ``torch.distributed`` is initialised the KL *sum and count* are all-reduced over the
    default process group, so every rank uses the global mean even when ranks hold different
    numbers of KL pairs. This is a collective: every rank must call ``forward`` the same
    number of times.

    Args:
        beta (float): β > 0. The paper's default is 0.1 (0.01–1.0 are reasonable).
        desirable_weight (float): λ_D > 0.
        undesirable_weight (float): λ_U > 0. The paper recommends choosing the weights so
            that ``λ_D·n_D / (λ_U·n_U)`` lies in [1, 4/3], where ``n_D``/``n_U`` count
            desirable/undesirable examples; with balanced data keep both at 1.0.

    Attributes: ``reference_free=False``, ``average_logps=False`` (summed log-probs),
    ``paired=False``.

    ``forward`` arguments (float tensors hold summed completion log-probs):
        policy_logps ``[B]``, reference_logps ``[B]``: the rows' completions.
        is_desirable ``[B]`` bool: True for desirable rows.
        policy_kl_logps ``[K]``, reference_kl_logps ``[K]``: the mismatched KL rows (usually
        ``K = B``; ``K`` may differ per rank and may be 0).

    Returns:
        ``(losses [B], rewards [B], kl [])``: per-example losses without reduction; rewards
        ``β·r`` detached; ``kl`` the 0-dim detached ``z_0`` actually used.
    """

    reference_free = False
    average_logps = False
    paired = False
    _hparams = ("beta", "desirable_weight", "undesirable_weight")

    def __init__(
        self,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
    ):
        super().__init__()
        self.beta = _positive("beta", beta)
        self.desirable_weight = _positive("desirable_weight", desirable_weight)
        self.undesirable_weight = _positive("undesirable_weight", undesirable_weight)

    def reward_scale(self) -> float:
        """``s`` of the logged implicit rewards ``s·(log π − log π_ref)``: β."""
        return self.beta

    @staticmethod
    def reference_point(
        policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor
    ) -> torch.Tensor:
        """``z0``: the (globally all-reduced) mean KL estimate, clamped at 0, detached, 0-dim."""
        with torch.no_grad():
            kl = (policy_kl_logps.detach() - reference_kl_logps.detach()).to(torch.float64)
            # [sum, count] in one tensor: one collective instead of two.
            stats = torch.stack([kl.sum(), kl.new_tensor(float(kl.numel()))])
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            total, count = stats[0], stats[1]
            z0 = torch.where(count > 0, total / count.clamp(min=1.0), torch.zeros_like(total))
            return z0.clamp(min=0.0).to(policy_kl_logps.dtype)

    def forward(
        self,
        policy_logps: torch.Tensor,
        reference_logps: Optional[torch.Tensor],
        is_desirable: torch.Tensor,
        policy_kl_logps: torch.Tensor,
        reference_kl_logps: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        name = type(self).__name__
        if reference_logps is None or reference_kl_logps is None:
            raise ValueError(
                f"{name} needs reference log-probs (reference_logps and reference_kl_logps) "
                "but got None; KTO is not reference-free"
            )
        _check_same_shape(
            name,
            {
                "policy_logps": policy_logps,
                "reference_logps": reference_logps,
                "is_desirable": is_desirable,
            },
        )
        _check_same_shape(
            name,
            {"policy_kl_logps": policy_kl_logps, "reference_kl_logps": reference_kl_logps},
        )
        if is_desirable.dtype != torch.bool:
            if is_desirable.dtype.is_floating_point or is_desirable.dtype.is_complex:
                raise ValueError(
                    f"{name}: is_desirable must be a bool tensor, got {is_desirable.dtype}"
                )
            is_desirable = is_desirable != 0

        z0 = self.reference_point(policy_kl_logps, reference_kl_logps)
        logratio = policy_logps - reference_logps
        # 1 - σ(x) = σ(-x), which stays accurate when σ(x) is close to 1.
        desirable = self.desirable_weight * torch.sigmoid(-self.beta * (logratio - z0))
        undesirable = self.undesirable_weight * torch.sigmoid(-self.beta * (z0 - logratio))
        losses = torch.where(is_desirable, desirable, undesirable)
        rewards = self.beta * logratio.detach()
        return losses, rewards, z0
