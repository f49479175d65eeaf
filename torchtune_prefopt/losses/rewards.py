"""The implicit rewards of preference pairs, asked of the loss itself, and pair accuracy.

Every loss returns its own detached implicit rewards from ``forward`` (DPO/KTO:
``β·(log π − log π_ref)`` on summed log-probs; IPO: ``τ·(...)``; SimPO: ``β·mean log π``). The
recipe's held-out evaluation and the comparison's metrics both use :func:`pair_rewards` so the
"reward accuracy" of a run is always the loss's own definition, never a copy of it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._base import loss_traits

__all__ = ["pair_accuracy", "pair_rewards"]


def pair_accuracy(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Per pair (float64): 1 where chosen scores higher, 0.5 on an exact tie (e.g. every reward
    is 0 before training), else 0."""
    return (chosen > rejected).double() + 0.5 * (chosen == rejected).double()


def pair_rewards(
    loss_fn,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Optional[Tensor],
    reference_rejected: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """The loss's implicit rewards ``(r(y_w), r(y_l))`` of ``B`` pairs, each ``[B]``, detached.

    The log-prob arguments are in the loss's own form (per-token means if
    ``loss_fn.average_logps``, else sums; ``SequenceLogProbs`` for a ``sequence_logps`` loss,
    which also takes tensors here: its ``rewards``); the reference ones may be ``None`` for a
    reference-free loss. Pairwise losses are called once on the pairs. Unpaired losses (KTO)
    are called with every chosen completion as a desirable row and every rejected one as an
    undesirable row, with no KL rows: their reward ``β·(log π − log π_ref)`` does not depend on
    the reference point ``z0`` (with ``torch.distributed`` initialised each call is a
    collective, as in training).
    """
    traits = loss_traits(loss_fn)
    with torch.no_grad():
        if traits.sequence_logps and callable(getattr(loss_fn, "rewards", None)):
            chosen, rejected = loss_fn.rewards(
                policy_chosen, policy_rejected, reference_chosen, reference_rejected
            )
        elif traits.paired:
            _, chosen, rejected = loss_fn(
                policy_chosen, policy_rejected, reference_chosen, reference_rejected
            )
        else:
            empty = policy_chosen.new_zeros(0)
            desirable = torch.ones(
                policy_chosen.shape[0], dtype=torch.bool, device=policy_chosen.device
            )
            _, chosen, _ = loss_fn(policy_chosen, reference_chosen, desirable, empty, empty)
            _, rejected, _ = loss_fn(policy_rejected, reference_rejected, ~desirable, empty, empty)
    return chosen.detach(), rejected.detach()
