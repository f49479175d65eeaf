"""Loss registry: short names, dotted import paths and third-party entry points.

``build_loss(spec)`` accepts

* a short name: ``"dpo"``;
* a dotted import path: ``"torchtune_prefopt.losses.DPOLoss"`` or ``"pkg.mod:Class"``;
* a mapping / omegaconf ``DictConfig`` with ``_component_`` (short name or dotted path) plus
  keyword arguments: ``{"_component_": "dpo", "beta": 0.2}`` — torchtune's config style;
* a mapping with ``name`` plus keyword arguments: ``{"name": "simpo", "gamma": 0.5}``;
* an already built :class:`PreferenceLoss` (returned unchanged).

Third-party packages register losses in the entry-point group ``torchtune_prefopt.losses``::

    [project.entry-points."torchtune_prefopt.losses"]
    myloss = "my_pkg.losses:MyLoss"

A built-in name always wins over an entry point of the same name (with a warning).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import warnings
from collections.abc import Mapping
from typing import Any, Dict, Optional

from torchtune_prefopt.errors import PrefOptUserError

from ._base import PreferenceLoss, loss_traits
from .apo import APOZeroLoss
from .dpo import DPOLoss, DPONormLoss, DPOPLoss, RobustDPOLoss
from .hinge import HingeLoss
from .ipo import IPOLoss
from .kto import KTOLoss
from .orpo import ORPOLoss
from .sft import SFTLoss
from .simpo import SimPOLoss

__all__ = ["ENTRY_POINT_GROUP", "available_losses", "get_loss_class", "build_loss"]

ENTRY_POINT_GROUP = "torchtune_prefopt.losses"

_BUILTIN: Dict[str, type] = {
    "dpo": DPOLoss,
    "ipo": IPOLoss,
    "simpo": SimPOLoss,
    "kto": KTOLoss,
    "hinge": HingeLoss,
    "rso": HingeLoss,
    "robust_dpo": RobustDPOLoss,
    "dpo_norm": DPONormLoss,
    "dpop": DPOPLoss,
    "apo_zero": APOZeroLoss,
    "orpo": ORPOLoss,
    "sft": SFTLoss,
}

_REQUIRED_ATTRS = ("reference_free", "average_logps", "paired")


# Every registry error is a PrefOptUserError (so the recipe reports it as one line) that is
# also the builtin type callers would expect.
class LossTypeError(PrefOptUserError, TypeError):
    """The spec or the object it names has the wrong type (not a usable loss class)."""


class LossEntryPointError(PrefOptUserError, ImportError):
    """A third-party entry point in ``torchtune_prefopt.losses`` failed to load."""


def _entry_points() -> Dict[str, importlib.metadata.EntryPoint]:
    """Entry points of our group, by name (first one wins on duplicates, like importlib)."""
    found: Dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def _valid_names() -> list:
    return sorted(set(_BUILTIN) | set(_entry_points()))


def _check_loss_class(cls: Any, origin: str) -> type:
    """A loss class must be a PreferenceLoss subclass or at least declare the three
    attributes the recipe reads (as booleans) and be callable."""
    if not isinstance(cls, type):
        raise LossTypeError(f"loss: {origin} is {cls!r}, not a class")
    if issubclass(cls, PreferenceLoss):
        return cls
    missing = [a for a in _REQUIRED_ATTRS if not isinstance(getattr(cls, a, None), bool)]
    if missing:
        hint = ""
        if cls.__module__.startswith("torchtune.rlhf"):
            hint = (
                "; torchtune's own losses do not declare them — use the drop-in "
                "replacements 'dpo' (torchtune_prefopt.losses.DPOLoss) or 'rso' "
                "(torchtune_prefopt.losses.HingeLoss)"
            )
        raise LossTypeError(
            f"loss: {origin} ({cls.__module__}.{cls.__qualname__}) is not a "
            f"torchtune_prefopt.losses.PreferenceLoss subclass and does not declare the "
            f"bool class attribute(s) {', '.join(missing)}{hint}"
        )
    return cls


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> type:
    dist = getattr(ep, "dist", None)
    dist_name = f" from distribution {dist.name!r}" if dist is not None else ""
    origin = f"entry point '{ep.name} = {ep.value}' (group {ENTRY_POINT_GROUP}{dist_name})"
    try:
        obj = ep.load()
    except Exception as exc:  # noqa: BLE001 - any failure in third-party code
        raise LossEntryPointError(
            f"loss: {origin} failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    return _check_loss_class(obj, origin)


def available_losses() -> Dict[str, type]:
    """``{name: class}`` for the built-in losses and every loadable entry-point loss.

    An entry point that fails to load (or names a class that is not a loss) is left out with
    a warning instead of breaking the listing; ``get_loss_class(name)`` raises its error.
    """
    result = dict(_BUILTIN)
    for name, ep in _entry_points().items():
        if name in _BUILTIN:
            warnings.warn(
                f"loss: entry point '{name} = {ep.value}' (group {ENTRY_POINT_GROUP}) is "
                f"shadowed by the built-in loss '{name}' and ignored",
                stacklevel=2,
            )
            continue
        try:
            result[name] = _load_entry_point(ep)
        except (ImportError, TypeError) as exc:
            warnings.warn(f"{exc} (left out of available_losses())", stacklevel=2)
    return dict(sorted(result.items()))


def _import_dotted(path: str) -> Any:
    """``pkg.mod.Class`` or ``pkg.mod:Class`` (nested attributes allowed after the colon)."""
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
        attrs = attr_path.split(".")
    else:
        module_name, _, attr = path.rpartition(".")
        attrs = [attr]
    if not module_name or not all(attrs):
        raise PrefOptUserError(f"loss: cannot import {path!r}: not a 'pkg.module.Class' path")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise PrefOptUserError(
            f"loss: cannot import {path!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for attr in attrs:
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise PrefOptUserError(
                f"loss: cannot import {path!r}: {obj!r} has no attribute {attr!r}"
            ) from None
    return obj


def get_loss_class(name: str) -> type:
    """The loss class for a short name (built-in or entry point) or a dotted import path.

    Short names are case-insensitive. Raises ``ValueError`` for an unknown name (listing the
    valid ones), ``ImportError`` for an entry point that fails to load, ``TypeError`` for an
    object that is not a loss class. All three are also
    :class:`~torchtune_prefopt.errors.PrefOptUserError`, whose message starts with ``loss``.
    """
    if not isinstance(name, str) or not name.strip():
        raise PrefOptUserError(
            f"loss: expected a loss name, got {name!r}; valid: {', '.join(_valid_names())}"
        )
    name = name.strip()
    key = name.lower()
    if key in _BUILTIN:
        return _BUILTIN[key]
    eps = _entry_points()
    for candidate in (name, key):
        if candidate in eps:
            return _load_entry_point(eps[candidate])
    if "." in name or ":" in name:
        return _check_loss_class(_import_dotted(name), f"{name!r}")
    raise PrefOptUserError(f"loss: unknown loss {name!r}; valid: {', '.join(_valid_names())}")


def _to_plain_mapping(spec: Any) -> Optional[dict]:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        DictConfig = None  # type: ignore[assignment]
    if DictConfig is not None and isinstance(spec, DictConfig):
        return OmegaConf.to_container(spec, resolve=True)  # type: ignore[return-value]
    if isinstance(spec, Mapping):
        return dict(spec)
    return None


def build_loss(spec: Any) -> PreferenceLoss:
    """Build a loss from a name, a dotted path, or a ``_component_``/``name`` mapping."""
    if isinstance(spec, PreferenceLoss):
        return spec
    if isinstance(spec, str):
        return _instantiate(get_loss_class(spec), {}, spec)
    cfg = _to_plain_mapping(spec)
    if cfg is None:
        raise LossTypeError(
            "loss: expected a loss name or a mapping with '_component_' or 'name', "
            f"got {type(spec).__name__}"
        )
    has_component, has_name = "_component_" in cfg, "name" in cfg
    if has_component and has_name:
        raise PrefOptUserError("loss: give either '_component_' or 'name', not both")
    if not (has_component or has_name):
        raise PrefOptUserError(
            "loss: a loss config needs '_component_' (short name or dotted path) or 'name'; "
            f"valid names: {', '.join(_valid_names())}"
        )
    target = cfg.pop("_component_" if has_component else "name")
    return _instantiate(get_loss_class(target), cfg, target)


def _instantiate(cls: type, kwargs: Dict[str, Any], target: str) -> PreferenceLoss:
    bad_keys = [k for k in kwargs if not isinstance(k, str)]
    if bad_keys:
        raise PrefOptUserError(f"loss: keyword names must be strings, got {bad_keys!r}")
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        sig = None
    if sig is not None:
        params = sig.parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            accepted = [
                p.name
                for p in params
                if p.kind
                in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            ]
            unknown = sorted(set(kwargs) - set(accepted))
            if unknown:
                raise PrefOptUserError(
                    f"loss.{unknown[0]}: {cls.__name__} ({target!r}) does not accept "
                    f"{', '.join(repr(u) for u in unknown)}; accepted: "
                    f"{', '.join(accepted) or '(none)'}"
                )
    loss = cls(**kwargs)
    loss_traits(loss)  # checked once here: every attribute a bool
    return loss
