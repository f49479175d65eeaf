"""Weighted sums of paired losses (TRL's ``loss_type=[...]`` with ``loss_weights``, MPO)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from torchtune_prefopt.errors import PrefOptUserError

from ._base import PairwiseLoss, PreferenceLoss, _non_negative, loss_inputs, loss_traits
from .registry import build_loss

__all__ = ["WeightedSum"]


class WeightedSum(PreferenceLoss):
    r"""``\ell = \sum_i w_i\,\ell_i``: a weighted sum of paired losses, each with its own
    arguments, from one policy pass and one reference pass.

    .. code-block:: yaml

        loss:
          _component_: torchtune_prefopt.losses.WeightedSum
          terms:
            - {loss: dpo, weight: 1.0, beta: 0.1}
            - {loss: apo_zero, weight: 0.5, beta: 0.1}
            - {loss: sft, weight: 0.2}

    A term is a mapping: ``loss`` (a registered name, an entry point's name or a dotted path),
    ``weight`` (default 1.0), an optional ``name`` (default: ``loss``; names must differ) and
    the loss's own arguments. Every term gets the log-probs in its own form (sums, per-token
    means or, with an SFT term, token counts: the lean log-prob path returns all three);
    ``sft`` is a term like any other. Each term's per-pair loss is kept in
    :attr:`term_losses` (logged as ``loss/<name>`` next to the total).

    Capabilities: reference-free only if every term is (a single reference-free term does not
    spare the reference the others need); paired only; ``needs_step_token_mean`` if a term does.
    The logged rewards are the first term's that has a reference-based reward (else the
    first term's).

    Args:
        terms: the list above (at least one term).
    """

    paired = True
    sequence_logps = True
    average_logps = False  # each term picks its own form

    def __init__(self, terms: Sequence[Mapping[str, Any]]):
        super().__init__()
        if isinstance(terms, Mapping) or not isinstance(terms, Sequence) or not terms:
            raise PrefOptUserError(
                "loss.terms must be a non-empty list of {loss: <name>, weight: <w>, ...}"
            )
        built: List[Tuple[str, float, PreferenceLoss]] = []
        for i, term in enumerate(terms):
            where = f"loss.terms[{i}]"
            if not isinstance(term, Mapping) or "loss" not in term:
                raise PrefOptUserError(f"{where} must be a mapping with a 'loss' key, got {term!r}")
            spec = dict(term)
            weight = _non_negative(f"terms[{i}].weight", spec.pop("weight", 1.0))
            name = str(spec.pop("name", spec["loss"]))
            spec["_component_"] = spec.pop("loss")
            try:
                loss = build_loss(spec)
            except PrefOptUserError as err:
                raise PrefOptUserError(f"{where}: {err}") from None
            if not isinstance(loss, PairwiseLoss):
                raise PrefOptUserError(
                    f"{where}: {type(loss).__name__} is not a paired loss of this package "
                    "(PairwiseLoss); a weighted sum combines paired terms (KTO is unpaired)"
                )
            if any(name == n for n, _, _ in built):
                raise PrefOptUserError(
                    f"{where}: a term named {name!r} exists already; give it a name"
                )
            built.append((name, weight, loss))
        self.names = [n for n, _, _ in built]
        self.weights = [w for _, w, _ in built]
        self.terms = torch.nn.ModuleList([t for _, _, t in built])
        traits = [loss_traits(t) for t in self.terms]
        self.reference_free = all(t.reference_free for t in traits)
        self.needs_step_token_mean = any(t.needs_step_token_mean for t in traits)
        rewarded = [i for i, t in enumerate(traits) if not t.reference_free]
        self._reward_index = (rewarded or [0])[0]
        self.term_losses: Dict[str, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {w}" for n, w in zip(self.names, self.weights))

    def reward_scale(self) -> float:
        """The logged rewards' scale: the reward term's."""
        return self.terms[self._reward_index].reward_scale()

    def rewards(self, pc, pr, rc=None, rr=None) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.terms[self._reward_index].rewards(pc, pr, rc, rr)

    def forward(
        self,
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps=None,
        reference_rejected_logps=None,
        chosen_tokens_per_pair: Optional[float] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        total = None
        term_losses = {}
        rewards = None
        for i, (name, weight, term) in enumerate(zip(self.names, self.weights, self.terms)):
            pc, pr = loss_inputs(term, policy_chosen_logps, policy_rejected_logps)
            traits = loss_traits(term)
            rc, rr = (None, None)
            if not traits.reference_free:
                rc, rr = loss_inputs(term, reference_chosen_logps, reference_rejected_logps)
            extra = {}
            if traits.sequence_logps:
                extra["chosen_tokens_per_pair"] = chosen_tokens_per_pair
            losses, chosen, rejected = term(pc, pr, rc, rr, **extra)
            if i == self._reward_index:
                rewards = (chosen, rejected)
            term_losses[name] = losses.detach()
            total = weight * losses if total is None else total + weight * losses
        self.term_losses = term_losses
        return total, rewards[0], rewards[1]
