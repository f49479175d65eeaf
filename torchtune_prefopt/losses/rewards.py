"""The implicit rewards of preference pairs, asked of the loss itself, and pair accuracy.

Every loss returns its own detached implicit rewards from ``forward`` (DPO/KTO:
``β·(log π − log π_ref)`` on summed log-probs; IPO: ``τ·(...)``; SimPO: ``β·mean log π``). The
recipe's held-out evaluation and the comparison's metrics both use :func:`pair_rewards` so the
"reward accuracy" of a run is always the loss's own definition, never a copy of it.

:func:`pair_metrics` is the one held-out evaluator of a batch of pairs: training's evaluation
logs its values as ``eval/<name>`` (means over the held-out rows of every rank) and the
comparison reports them as ``heldout/<name>`` (means over its held-out rows): one set of
names, one definition.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from torchtune_prefopt.modules.sequence_logprobs import SequenceLogProbs

from ._base import loss_inputs, loss_traits

__all__ = ["PAIR_METRICS", "pair_accuracy", "pair_metrics", "pair_rewards"]

#: what :func:`pair_metrics` returns (per pair), and what each value is
PAIR_METRICS = {
    "rewards/accuracies": "pair accuracy of the loss's OWN implicit reward r(y_w) vs r(y_l), r computed "
    "by the loss object (DPO/KTO: beta*(S - S_ref); IPO: tau*(A - A_ref) with average_logps, "
    "tau*(S - S_ref) without; SimPO: beta*A); a margin within float rounding of zero "
    "(|r_w - r_l| <= s * 2^-20 * the sum of the |log-probs| it is made of) is a tie, 1/2: "
    "a policy that has not moved does not score",
    "rewards/margins": "r(y_w) - r(y_l), in the loss's own reward units (not comparable across losses)",
    "rewards/chosen": "r(y_w)",
    "rewards/rejected": "r(y_l)",
    "logps/chosen": "S(y_w), the policy's summed log-prob of the chosen completion (nats)",
    "logps/rejected": "S(y_l)",
    "logps/accuracies": "pair accuracy of the policy's own summed log-probs, S(y_w) vs S(y_l): does the "
    "model assign the chosen answer more probability?",
    "reference/accuracies": "the same for the reference, S_ref(y_w) vs S_ref(y_l)",
}


def pair_accuracy(chosen: Tensor, rejected: Tensor, tolerance: Optional[Tensor] = None) -> Tensor:
    """Per pair (float64): 1 where chosen scores higher, 0.5 on a tie (e.g. every reward is 0
    before training), else 0. ``tolerance`` ``[B]``: a margin ``|chosen - rejected|`` at most
    this large is a tie too (float rounding, not a preference)."""
    margin = chosen.double() - rejected.double()
    if tolerance is None:
        return (margin > 0).double() + 0.5 * (margin == 0).double()
    tolerance = tolerance.double()
    return (margin > tolerance).double() + 0.5 * (margin.abs() <= tolerance).double()


#: relative float rounding a reward margin must exceed to count (about 8 fp32 ulps)
ROUNDING = 2.0**-20


def _rounding_tolerance(loss_fn, logps) -> Optional[Tensor]:
    """``s * ROUNDING * (|a_w| + |a_l| + |ref_w| + |ref_l|)`` ``[B]``: how far float rounding of
    the log-probs ``logps`` (``SequenceLogProbs`` or ``None``; ``a``: their sums or means, the
    form the loss's rewards take) can move the reward margin ``s * (...)``; ``None`` for a loss
    that does not say its reward scale ``s``."""
    scale = getattr(loss_fn, "reward_scale", None)
    if not callable(scale):
        return None
    try:
        s = abs(float(scale()))
    except NotImplementedError:
        return None
    average = loss_traits(loss_fn).average_logps
    parts = [lp.form(average).detach().double().abs() for lp in logps if lp is not None]
    return s * ROUNDING * sum(parts[1:], parts[0]) if parts else None


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


def pair_metrics(
    loss_fn,
    policy: Tuple[SequenceLogProbs, SequenceLogProbs],
    reference: Optional[Tuple[SequenceLogProbs, SequenceLogProbs]],
) -> Dict[str, Tensor]:
    """The held-out metrics of ``B`` pairs (:data:`PAIR_METRICS`), each ``[B]`` float64, not
    yet averaged (the caller sums over its rows, ranks and batches).

    Args:
        loss_fn: the loss whose implicit rewards are asked (``None``: no ``rewards/*``, e.g.
            for the reference itself).
        policy: ``(chosen, rejected)`` log-probs of the model evaluated.
        reference: the reference's, or ``None`` (a reference-free loss, or the reference
            itself): no ``reference/accuracies``.
    """
    chosen, rejected = policy
    out = {
        "logps/chosen": chosen.sum.detach().double(),
        "logps/rejected": rejected.sum.detach().double(),
        "logps/accuracies": pair_accuracy(chosen.sum, rejected.sum),
    }
    if reference is not None:
        out["reference/accuracies"] = pair_accuracy(reference[0].sum, reference[1].sum)
    if loss_fn is not None:
        pc, pr = loss_inputs(loss_fn, chosen, rejected)
        rc, rr = loss_inputs(loss_fn, *(reference or (None, None)))
        if rc is None and not loss_traits(loss_fn).reference_free:
            raise ValueError(f"{type(loss_fn).__name__} needs reference log-probs")
        c, r = pair_rewards(loss_fn, pc, pr, rc, rr)
        c, r = c.double(), r.double()
        tolerance = _rounding_tolerance(loss_fn, (chosen, rejected, *(reference or ())))
        out["rewards/accuracies"] = pair_accuracy(c, r, tolerance)
        out["rewards/margins"] = c - r
        out["rewards/chosen"] = c
        out["rewards/rejected"] = r
    return out
