"""Base class and shared helpers for preference losses.

Every loss in :mod:`torchtune_prefopt.losses` subclasses :class:`PreferenceLoss` and declares
three attributes that the recipe reads *before* it runs any model:

``reference_free``
    ``True``: the loss never looks at reference log-probs, so the recipe loads no reference
    model and runs no reference forward.
``average_logps``
    ``True``: every log-prob argument is the per-token *mean* over the completion tokens;
    ``False``: it is the *sum* over the completion tokens.
``paired``
    ``True``: chosen/rejected pairs (``forward(policy_chosen_logps, policy_rejected_logps,
    reference_chosen_logps, reference_rejected_logps)``); ``False``: unpaired rows (KTO).

and optionally

``sequence_logps``
    ``True``: the four arguments are
    :class:`~torchtune_prefopt.modules.sequence_logprobs.SequenceLogProbs` (sums, per-token
    means and token counts of each completion) instead of tensors in the ``average_logps``
    form: a loss with an SFT term (token counts) or a sum of terms that take different forms
    picks what each needs. Every :class:`PairwiseLoss` does; third-party losses get tensors.
``needs_step_token_mean``
    ``True``: ``forward`` takes ``chosen_tokens_per_pair``, the mean number of chosen
    completion tokens per pair over the whole optimizer step (all ranks and micro-batches),
    which the recipe computes: the SFT term is then a token mean over the global batch,
    independent of the number of processes (see :func:`chosen_nll`).

The attributes are class defaults and may be overridden per instance (e.g.
``IPOLoss(average_logps=False)``). Nothing reads them directly: :func:`loss_traits` is the one
reader (it checks them and applies the ``sequence_logps`` rule of :func:`takes_sequence_logps`)
and every caller (recipe, reference planner, evaluation, comparison) reads its frozen
:class:`LossTraits`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Optional, Tuple

import torch
from torch import nn

from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.modules.sequence_logprobs import SequenceLogProbs

__all__ = [
    "LossTraits",
    "PairwiseLoss",
    "PreferenceLoss",
    "chosen_nll",
    "loss_inputs",
    "loss_traits",
    "takes_sequence_logps",
]

# Hyper-parameter errors are PrefOptUserError (a ValueError): the recipe reports them as one
# line, unchanged, so the message must start with the config key (``loss.beta ...``).


def _as_float(key: str, value) -> float:
    """``value`` as a finite Python float, else ``ValueError('loss.<key> must be ...')``."""
    # bool is a Real subclass; ``beta: true`` in a YAML file is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, Real):
        raise PrefOptUserError(f"loss.{key} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise PrefOptUserError(f"loss.{key} must be finite, got {value!r}")
    return value


def _positive(key: str, value) -> float:
    value = _as_float(key, value)
    if not value > 0:
        raise PrefOptUserError(f"loss.{key} must be > 0, got {value!r}")
    return value


def _non_negative(key: str, value) -> float:
    value = _as_float(key, value)
    if not value >= 0:
        raise PrefOptUserError(f"loss.{key} must be >= 0, got {value!r}")
    return value


def _label_smoothing(key: str, value) -> float:
    value = _as_float(key, value)
    if not 0.0 <= value < 0.5:
        raise PrefOptUserError(f"loss.{key} must be in [0, 0.5), got {value!r}")
    return value


def _bool(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise PrefOptUserError(f"loss.{key} must be true or false, got {value!r}")
    return value


class PreferenceLoss(nn.Module):
    """Base class of every preference loss (see the module docstring for the contract).

    Subclasses implement ``forward`` without reduction (per-example losses) and return
    detached rewards. The class attributes below are defaults; instances may override them.
    """

    #: True: needs no reference log-probs (the recipe skips the reference model).
    reference_free: bool = False
    #: True: log-prob inputs are per-token means over the completion; False: sums.
    average_logps: bool = False
    #: True: chosen/rejected pairs; False: unpaired rows (KTO).
    paired: bool = True
    #: True: ``forward`` takes SequenceLogProbs (sum, mean, token count), not tensors.
    sequence_logps: bool = False
    #: True: ``forward`` takes ``chosen_tokens_per_pair`` (the recipe's global step value).
    needs_step_token_mean: bool = False

    # Names of the hyper-parameters shown by ``repr`` (subclasses set this).
    _hparams: Tuple[str, ...] = ()

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self._hparams)

    # ----------------------------------------------------------------- input checks
    def _check_pair_inputs(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: Optional[torch.Tensor],
        reference_rejected_logps: Optional[torch.Tensor],
    ) -> None:
        """Shapes must match exactly (no silent broadcasting); references required unless
        the loss is reference-free."""
        named = {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
        }
        if not self.reference_free:
            missing = [
                n
                for n, t in (
                    ("reference_chosen_logps", reference_chosen_logps),
                    ("reference_rejected_logps", reference_rejected_logps),
                )
                if t is None
            ]
            if missing:
                raise ValueError(
                    f"{type(self).__name__} needs reference log-probs but got None for "
                    f"{', '.join(missing)}; it is not reference-free (reference_free=False), "
                    "so the recipe must run a reference model or load cached reference log-probs"
                )
            named["reference_chosen_logps"] = reference_chosen_logps
            named["reference_rejected_logps"] = reference_rejected_logps
        _check_same_shape(type(self).__name__, named)

    def _logratios(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: Optional[torch.Tensor],
        reference_rejected_logps: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Checked inputs -> ``(log π(y_w) − log π_ref(y_w), log π(y_l) − log π_ref(y_l))``,
        each ``[B]``; the pairwise margin is ``h = chosen − rejected``."""
        self._check_pair_inputs(
            policy_chosen_logps,
            policy_rejected_logps,
            reference_chosen_logps,
            reference_rejected_logps,
        )
        return (
            policy_chosen_logps - reference_chosen_logps,
            policy_rejected_logps - reference_rejected_logps,
        )


class PairwiseLoss(PreferenceLoss):
    r"""Base of the pairwise losses: the log-ratios, the margin, the rewards and the optional
    SFT term are computed here; each loss supplies its function of the margin
    (:meth:`margin_loss`) and its reward scale (:meth:`reward_scale`) and documents its
    equation.

    With the per-sequence log-ratios in the loss's form (sums, or per-token means with
    ``average_logps``; reference-free losses: the policy log-probs alone)

    .. math::
        r_w = \log\pi(y_w) - \log\pi_{ref}(y_w),\quad
        r_l = \log\pi(y_l) - \log\pi_{ref}(y_l),\quad h = r_w - r_l,

    the per-pair loss is

    .. math::
        \ell = f(r_w, r_l) + w_{sft}\,\frac{-\sum_{t\in y_w}\log\pi(y_{w,t})}{\bar T_w}

    with ``f = margin_loss(h)`` (or :meth:`pair_losses`) and the SFT term of
    :func:`chosen_nll` (``sft_weight`` ``w_sft``, default 0): averaged over the pairs of the
    optimizer step, it is ``w_sft`` times the negative log-likelihood of the chosen tokens
    averaged over every chosen token of the global batch. ``forward`` returns ``(ℓ [B], s·r_w
    [B], s·r_l [B])`` with ``s = reward_scale()`` and the rewards detached.

    ``forward`` arguments: policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
    reference_rejected_logps (the reference ones required unless ``reference_free``; ignored,
    may be ``None``, if it is): each a ``SequenceLogProbs`` ``[B]`` (``sequence_logps``), or a
    1-D float tensor ``[B]`` in the ``average_logps`` form (then ``sft_weight`` must be 0: the
    token counts are missing); ``chosen_tokens_per_pair`` (``T̄_w``; default: this call's mean).
    """

    paired = True
    sequence_logps = True
    #: weight of the SFT (NLL of the chosen completion) term; set by the constructors
    sft_weight: float = 0.0

    def _set_sft_weight(self, sft_weight) -> None:
        self.sft_weight = _non_negative("sft_weight", sft_weight)

    @property
    def needs_step_token_mean(self) -> bool:  # type: ignore[override]
        return self.sft_weight > 0

    def reward_scale(self) -> float:
        """``s`` of the logged implicit rewards ``s·r`` (DPO: β, IPO: τ)."""
        raise NotImplementedError

    def margin_loss(self, h: torch.Tensor) -> torch.Tensor:
        """The per-pair loss of the margin ``h`` ``[B]``."""
        raise NotImplementedError

    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        """The per-pair loss of the log-ratios ``r_w``, ``r_l``; ``margin_loss(r_w - r_l)``."""
        return self.margin_loss(chosen - rejected)

    def _ratios(self, pc, pr, rc, rr) -> Tuple[torch.Tensor, torch.Tensor]:
        pc, pr, rc, rr = (_form(x, self.average_logps) for x in (pc, pr, rc, rr))
        if self.reference_free:
            self._check_pair_inputs(pc, pr, None, None)
            return pc, pr
        return self._logratios(pc, pr, rc, rr)

    def rewards(self, pc, pr, rc=None, rr=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The detached implicit rewards ``(s·r_w, s·r_l)`` alone (no loss, no SFT term)."""
        chosen, rejected = self._ratios(pc, pr, rc, rr)
        scale = self.reward_scale()
        return scale * chosen.detach(), scale * rejected.detach()

    def forward(
        self,
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps=None,
        reference_rejected_logps=None,
        chosen_tokens_per_pair: Optional[float] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen, rejected = self._ratios(
            policy_chosen_logps,
            policy_rejected_logps,
            reference_chosen_logps,
            reference_rejected_logps,
        )
        losses = self.pair_losses(chosen, rejected)
        if self.sft_weight > 0:
            losses = losses + self.sft_weight * chosen_nll(
                policy_chosen_logps, chosen_tokens_per_pair
            )
        scale = self.reward_scale()
        return losses, scale * chosen.detach(), scale * rejected.detach()


def _form(x, average: bool):
    return x.form(average) if isinstance(x, SequenceLogProbs) else x


def chosen_nll(policy_chosen, tokens_per_pair: Optional[float] = None) -> torch.Tensor:
    r"""The SFT term per pair, ``[B]``: ``-Σ_t log π(y_{w,t}) / T̄_w``.

    ``T̄_w`` (``tokens_per_pair``) is the mean number of chosen tokens per pair over the
    optimizer step's global batch (the recipe all-reduces the token counts of every rank and
    micro-batch); averaged over the step's pairs the term is then exactly the token-mean NLL
    of all chosen tokens, ``-Σ_{pairs} Σ_t log π / Σ_{pairs} |y_w|``, whatever the number of
    processes (TRL averages per device micro-batch instead). ``None``: this call's own mean
    (one process, one micro-batch: the same). A row with no token contributes 0.

    Args:
        policy_chosen: ``SequenceLogProbs`` ``[B]`` of the chosen completions (its ``sum`` and
            ``num_tokens``).
    """
    if not isinstance(policy_chosen, SequenceLogProbs):
        raise ValueError(
            "sft_weight > 0 needs the chosen completions' token counts: pass SequenceLogProbs "
            "(sum, mean, num_tokens), not tensors"
        )
    if tokens_per_pair is None:
        tokens_per_pair = policy_chosen.num_tokens.double().mean().clamp(min=1.0)
    return -policy_chosen.sum / tokens_per_pair


@dataclass(frozen=True)
class LossTraits:
    """What callers need to know of a loss before any model runs (see the module docstring).

    Attributes:
        reference_free: no reference log-probs (no reference model is loaded).
        average_logps: tensor inputs are per-token means (else sums) over the completion.
        paired: chosen/rejected pairs (else unpaired rows: KTO).
        sequence_logps: ``forward`` takes ``SequenceLogProbs`` (the effective rule of
            :func:`takes_sequence_logps`, not just the declared flag).
        needs_step_token_mean: ``forward`` takes ``chosen_tokens_per_pair``.
    """

    reference_free: bool
    average_logps: bool
    paired: bool
    sequence_logps: bool
    needs_step_token_mean: bool


#: the attributes a loss declares, with the default of a loss that leaves one out
_TRAIT_DEFAULTS = {
    "reference_free": False,
    "average_logps": False,
    "paired": True,
    "sequence_logps": False,
    "needs_step_token_mean": False,
}


def _unwrapped(loss):
    """The loss module itself (``torch.compile`` wraps it in an ``OptimizedModule``)."""
    return getattr(loss, "_orig_mod", loss)


def loss_traits(loss) -> LossTraits:
    """The one reader of a loss's declared attributes: checked (each a ``bool``, else one line
    naming it) and frozen. ``loss`` may be compiled."""
    loss = _unwrapped(loss)
    values = {}
    for name, default in _TRAIT_DEFAULTS.items():
        value = getattr(loss, name, default)
        if not isinstance(value, bool):
            raise PrefOptUserError(
                f"loss: {type(loss).__name__}.{name} must be True or False, got {value!r}"
            )
        values[name] = value
    if values["sequence_logps"]:
        # a subclass that overrides ``forward`` below the class that declares the flag keeps
        # getting tensors (as before the flag existed) until it declares the flag itself
        mro = type(loss).__mro__
        flag = next((i for i, k in enumerate(mro) if "sequence_logps" in k.__dict__), len(mro))
        forward = next((i for i, k in enumerate(mro) if "forward" in k.__dict__), len(mro))
        values["sequence_logps"] = flag <= forward
    return LossTraits(**values)


def takes_sequence_logps(loss) -> bool:
    """``loss.sequence_logps``, unless a subclass overrides ``forward`` below the class that
    declares the flag: a custom loss derived from, say, ``DPOLoss`` with its own tensor
    ``forward`` keeps getting tensors (as before the flag existed) until it declares
    ``sequence_logps = True`` itself (:attr:`LossTraits.sequence_logps`)."""
    return loss_traits(loss).sequence_logps


def loss_inputs(loss, first, second):
    """What ``loss`` takes for the two halves of a batch (policy or reference): the
    ``SequenceLogProbs`` themselves (``loss.sequence_logps``), else their sums or per-token
    means (``loss.average_logps``); ``(None, None)`` for no log-probs. The one owner of that
    rule (recipe, evaluation, comparison)."""
    if first is None:
        return None, None
    traits = loss_traits(loss)
    if traits.sequence_logps:
        return first, second
    return first.form(traits.average_logps), second.form(traits.average_logps)


def _check_same_shape(owner: str, named: dict) -> None:
    shapes = {n: tuple(t.shape) for n, t in named.items()}
    first = next(iter(shapes.values()))
    if any(s != first for s in shapes.values()):
        detail = ", ".join(f"{n}={list(s)}" for n, s in shapes.items())
        raise ValueError(f"{owner}: input shapes must match, got {detail}")
    if len(first) != 1:
        raise ValueError(f"{owner}: expected 1-D [batch] log-prob tensors, got shape {list(first)}")


def _conservative_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1-ε)·logσ(z) - ε·logσ(-z)`` (the cDPO form; plain ``-logσ(z)`` when ε == 0)."""
    nll = -torch.nn.functional.logsigmoid(z)
    if label_smoothing == 0.0:
        return nll
    return (1.0 - label_smoothing) * nll - label_smoothing * torch.nn.functional.logsigmoid(-z)
