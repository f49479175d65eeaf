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

The attributes are class defaults and may be overridden per instance (e.g.
``IPOLoss(average_logps=False)``).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Tuple

import torch
from torch import nn

from torchtune_prefopt.errors import PrefOptUserError

__all__ = ["PairwiseLoss", "PreferenceLoss"]

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
    r"""Base of the pairwise losses: the log-ratios, the margin and the rewards are computed
    here, each loss supplies its function of the margin (:meth:`margin_loss`) and its reward
    scale (:meth:`reward_scale`) and documents its equation.

    With the per-sequence log-ratios (reference-free losses: the policy log-probs alone)

    .. math::
        r_w = \log\pi(y_w) - \log\pi_{ref}(y_w),\quad
        r_l = \log\pi(y_l) - \log\pi_{ref}(y_l),\quad h = r_w - r_l,

    ``forward`` returns ``(margin_loss(h) [B], s·r_w [B], s·r_l [B])`` with ``s =
    reward_scale()`` and the rewards detached. A loss that is not a function of ``h`` alone
    overrides :meth:`pair_losses` instead.

    ``forward`` arguments (all 1-D ``[B]``, float; sums or per-token means according to
    ``average_logps``): policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
    reference_rejected_logps (required unless ``reference_free``; ignored, may be ``None``,
    if it is).
    """

    paired = True

    def reward_scale(self) -> float:
        """``s`` of the logged implicit rewards ``s·r`` (DPO: β, IPO: τ)."""
        raise NotImplementedError

    def margin_loss(self, h: torch.Tensor) -> torch.Tensor:
        """The per-pair loss of the margin ``h`` ``[B]``."""
        raise NotImplementedError

    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        """The per-pair loss of the log-ratios ``r_w``, ``r_l``; ``margin_loss(r_w - r_l)``."""
        return self.margin_loss(chosen - rejected)

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: Optional[torch.Tensor] = None,
        reference_rejected_logps: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.reference_free:
            self._check_pair_inputs(policy_chosen_logps, policy_rejected_logps, None, None)
            chosen, rejected = policy_chosen_logps, policy_rejected_logps
        else:
            chosen, rejected = self._logratios(
                policy_chosen_logps,
                policy_rejected_logps,
                reference_chosen_logps,
                reference_rejected_logps,
            )
        scale = self.reward_scale()
        losses = self.pair_losses(chosen, rejected)
        return losses, scale * chosen.detach(), scale * rejected.detach()


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
