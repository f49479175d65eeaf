"""Config names: packaged configs, third-party configs, and the recipes' ``--config`` parsing.

A *config name* is the path of a YAML file relative to a config folder, without ``.yaml``
(``configs/tiny/dpo.yaml`` -> ``tiny/dpo``). Names come from two places:

* our own configs, shipped inside the package (``torchtune_prefopt/configs``, a symlink to
  the repo's top-level ``configs/`` that hatchling follows when it builds the wheel);
* third-party packages, through the entry-point group ``torchtune_prefopt.configs``. An
  entry point's value is an importable package (``acme_configs``); every YAML file under
  that package's directory is registered under its relative path (``acme_configs/acme/x.yaml``
  -> ``acme/x``). The entry point's *name* is not part of the config name.
  The package is located with :func:`importlib.util.find_spec`, not imported (for a dotted
  value its parent packages are imported, as Python requires).

Two different files claiming the same name is an error naming both (:class:`ConfigNameClashError`).

:func:`resolve_config` turns ``--config`` values into files (an existing file path wins,
then a config name); :func:`load_config` / :func:`parse` implement torchtune's
``config.parse`` command-line semantics (``--config X key=value ~key``) on top of it, so
``python -m torchtune_prefopt.recipes.prefopt_distributed --config tiny/dpo`` and ``torchrun``
of the recipe file accept names just like ``tune run`` does.

This module imports only the standard library at import time: the ``tune`` registry hook
(:mod:`torchtune_prefopt._tune_registry`) uses :func:`available_configs`.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = [
    "ENTRY_POINT_GROUP",
    "ConfigNameClashError",
    "ConfigNotFoundError",
    "available_configs",
    "load_config",
    "packaged_configs_dir",
    "parse",
    "resolve_config",
]

ENTRY_POINT_GROUP = "torchtune_prefopt.configs"
_SUFFIX = ".yaml"


try:  # the project's user-error base (a ValueError; stdlib-only module)
    from torchtune_prefopt.errors import PrefOptUserError as _UserError
except Exception:  # pragma: no cover - keep this module usable on its own
    _UserError = ValueError


class ConfigNotFoundError(_UserError):
    """``--config`` is neither an existing file nor a known config name."""


class ConfigNameClashError(_UserError):
    """Two different YAML files are registered under the same config name."""


def packaged_configs_dir() -> Path:
    """The directory holding our packaged configs (``<package>/configs``), as an absolute path.

    Kept unresolved: in a development checkout it goes through the ``configs`` symlink, in
    an installed wheel it is a real directory.
    """
    base: Optional[Path] = None
    try:
        from importlib.resources import files

        traversable = files(__package__ or "torchtune_prefopt")
        if isinstance(traversable, Path):  # a real directory (not a zip or namespace package)
            base = traversable
    except Exception:
        base = None
    if base is None:
        base = Path(__file__).parent
    return base.absolute() / "configs"


def _yaml_files(root: Path) -> Dict[str, Path]:
    """``{relative/name: absolute path}`` for every ``*.yaml`` under ``root`` (follows symlinks)."""
    found: Dict[str, Path] = {}
    if not root.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for filename in sorted(filenames):
            if filename.startswith(".") or not filename.endswith(_SUFFIX):
                continue
            path = Path(dirpath, filename)
            name = path.relative_to(root).as_posix()[: -len(_SUFFIX)]
            found[name] = path.absolute()
    return found


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _entry_point_sources() -> List[tuple]:
    """``[(description, directory)]`` for every directory provided through the entry points."""
    import warnings
    from importlib import metadata
    from importlib.util import find_spec

    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # pragma: no cover - Python < 3.10 API, kept for robustness
        eps = metadata.entry_points().get(ENTRY_POINT_GROUP, [])

    sources = []
    seen = set()
    for ep in eps:
        dist = getattr(ep, "dist", None)
        dist_name = getattr(dist, "name", None) or "?"
        key = (dist_name, ep.name, ep.value)
        if key in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add(key)
        module_name = ep.value.split(":", 1)[0].strip()
        where = f"entry point {ep.name!r} = {ep.value!r} of {dist_name}"
        try:
            spec = find_spec(module_name)
        except Exception as exc:  # broken third-party package: skip it, loudly
            spec = None
            reason = f"{type(exc).__name__}: {exc}"
        else:
            reason = "not an importable package"
        locations = list(getattr(spec, "submodule_search_locations", None) or [])
        if not locations:
            warnings.warn(
                f"torchtune-prefopt: ignoring config {where}: {reason}",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        for location in locations:
            sources.append((where, Path(location)))
    return sources


def available_configs() -> Dict[str, Path]:
    """All config names -> absolute YAML paths: packaged configs first, then third-party ones.

    Raises:
        ConfigNameClashError: if two different files are registered under one name.
    """
    ours_where = f"torchtune-prefopt ({packaged_configs_dir()})"
    configs: Dict[str, Path] = {}
    origin: Dict[str, str] = {}
    for name, path in _yaml_files(packaged_configs_dir()).items():
        configs[name] = path
        origin[name] = ours_where

    third_party: Dict[str, Path] = {}
    for where, directory in _entry_point_sources():
        for name, path in _yaml_files(directory).items():
            previous = configs.get(name, third_party.get(name))
            if previous is not None:
                if _same_file(previous, path):
                    continue
                raise ConfigNameClashError(
                    f"config name {name!r} is provided twice: by {origin[name]} as "
                    f"{previous} and by {where} as {path}"
                )
            third_party[name] = path
            origin[name] = where
    for name in sorted(third_party):
        configs[name] = third_party[name]
    return configs


def resolve_config(name_or_path: "str | os.PathLike[str]") -> Path:
    """The YAML file for a ``--config`` value.

    An existing file path (absolute, or relative to the current directory) wins; otherwise
    the value is looked up as a config name (``tiny/dpo``; a trailing ``.yaml`` is tolerated).

    Raises:
        ConfigNotFoundError: one line, with close matches and how to list the names.
        ConfigNameClashError: if the installed configs clash (only consulted for names).
    """
    raw = os.fspath(name_or_path)
    candidate = Path(raw).expanduser()
    if raw and candidate.is_file():
        return candidate.absolute()

    configs = available_configs()
    name = raw.replace(os.sep, "/")
    for key in (name, name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else None):
        if key and key in configs:
            return configs[key]

    import difflib

    close = difflib.get_close_matches(name, list(configs), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigNotFoundError(
        f"unknown config {raw!r}: no such file and no such config name; {hint}"
        "run `tune ls` to list the config names"
    )


def _build_parser(description: Optional[str] = None, prog: Optional[str] = None):
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=str,
        required=True,
        help="config name (see `tune ls`) or path of a YAML file with the recipe's settings",
    )
    return parser


def load_config(
    argv: Optional[Sequence[str]] = None,
    *,
    description: Optional[str] = None,
    prog: Optional[str] = None,
):
    """Parse ``--config X [key=value ...] [~key ...]`` into an OmegaConf ``DictConfig``.

    Same semantics as ``torchtune.config.parse`` (it uses torchtune's own merge function),
    except that ``X`` goes through :func:`resolve_config`, so config *names* work too.

    Args:
        argv: the arguments, without the program name; default ``sys.argv[1:]``.

    Raises:
        ConfigNotFoundError / ConfigNameClashError: ``X`` could not be resolved.
        ValueError: unsupported ``--flag`` arguments, or malformed overrides (from torchtune).
    """
    from argparse import Namespace

    args = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser(description=description, prog=prog)
    namespace, cli_args = parser.parse_known_args(args)

    unknown_flags = [arg for arg in cli_args if arg.startswith("--")]
    if unknown_flags:
        raise ValueError(
            f"Additional flag arguments not supported: {unknown_flags}. "
            "Please use --config or key=value overrides"
        )

    path = resolve_config(namespace.config)  # before the heavy imports: errors come fast

    from torchtune.config._utils import _merge_yaml_and_cli_args

    yaml_dict = _load_yaml_mapping(path)
    if "config" in yaml_dict:
        raise ValueError(f"Cannot use 'config' within a config file ({path})")
    _start_swapped_components_fresh(yaml_dict, cli_args)
    return _merge_yaml_and_cli_args(Namespace(**yaml_dict), cli_args)


def _load_yaml_mapping(path: Path) -> Dict[str, Any]:
    """The YAML file as a plain dict (interpolations unresolved); a file that does not parse,
    or whose top level is not a mapping of keys, is a one-line error naming file and line."""
    from omegaconf import DictConfig, OmegaConf

    try:
        cfg = OmegaConf.load(path)
    except UnicodeDecodeError as err:
        raise _UserError(
            f"config {path}: not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    except Exception as err:  # yaml.YAMLError and OmegaConf's own errors
        mark, context = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        if context is not None and getattr(err, "context", None):
            problem += f" ({err.context} at line {context.line + 1})"
        raise _UserError(f"config {path}:{where} is not valid YAML: {problem}") from None
    if not isinstance(cfg, DictConfig):
        raise _UserError(
            f"config {path}: the top level must be a mapping of config keys (key: value), got a "
            f"{type(OmegaConf.to_container(cfg)).__name__}"
        )
    return OmegaConf.to_container(cfg, resolve=False)


def _start_swapped_components_fresh(yaml_dict: Dict[str, Any], cli_args: Sequence[str]) -> None:
    """``KEY=VALUE`` on the command line where the YAML's ``KEY`` is a component
    (``_component_`` + arguments) and ``VALUE`` names another component: the new component
    starts from its own defaults (plus what the command line sets, e.g. ``loss=ipo
    loss.tau=0.05``); the old component's arguments are dropped, not passed on (torchtune's own
    merge keeps them: ``loss=simpo`` on a DPO config would silently keep DPO's ``beta``).
    ``KEY=null`` (disable an optional component) and ``KEY._component_=...`` keep torchtune's
    behaviour. Edits ``yaml_dict`` in place."""
    for arg in cli_args:
        if arg.startswith("~") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        node: Any = yaml_dict
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        old = node.get(parts[-1])
        if not (isinstance(old, dict) and "_component_" in old) or value in (
            "null",
            "None",
            "~",
            "",
        ):
            continue
        if not _same_component(old.get("_component_"), value):
            node[parts[-1]] = {"_component_": old.get("_component_")}


def _same_component(a: Any, b: str) -> bool:
    """Whether two ``_component_`` strings name the same object (``dpo`` and
    ``torchtune_prefopt.losses.DPOLoss`` do); unresolvable names compare as text."""
    if a == b:
        return True

    def resolve(name: Any) -> Any:
        if not isinstance(name, str):
            return name
        try:
            from torchtune_prefopt.losses.registry import get_loss_class

            return get_loss_class(name)
        except Exception:  # noqa: BLE001 - not a loss name
            pass
        try:
            from torchtune.config._utils import _get_component_from_path

            return _get_component_from_path(name)
        except Exception:  # noqa: BLE001 - unresolvable: compare the text
            return name

    return resolve(a) is resolve(b)


def components_from_working_directory() -> None:
    """Put the working directory on ``sys.path`` (last: it never shadows an installed
    package), so a ``_component_`` in a local file (``my_tokenizer.MyTokenizer`` next to the
    config) imports in every process.

    A single ``tune run`` process runs the recipe with ``runpy`` and already has it; torchrun
    workers run the recipe file as a script, whose ``sys.path[0]`` is the recipe's folder, so
    without this a local component works on one process and fails on two."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)


def parse(recipe_main: Callable[[Any], Any]) -> Callable[..., Any]:
    """Decorator like ``torchtune.config.parse``, accepting config names for ``--config``.

    ``recipe_main(cfg)`` is called with the merged ``DictConfig`` and its return value is
    passed to ``sys.exit``. Command-line mistakes (unknown config, bad override) exit with
    status 2 and one ``<prog>: error: ...`` line on stderr (rank 0 only under torchrun),
    without a traceback; ``PREFOPT_DEBUG=1`` re-raises instead (as
    :func:`torchtune_prefopt.errors.report_user_errors` does).
    """

    @functools.wraps(recipe_main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else None
        components_from_working_directory()
        try:
            conf = load_config(sys.argv[1:], description=recipe_main.__doc__, prog=prog)
        except ValueError as exc:
            from torchtune_prefopt.errors import debug_enabled

            if debug_enabled():
                raise
            if os.environ.get("RANK", "0") == "0":
                message = " ".join(str(exc).split())  # guaranteed one line
                print(f"{prog or 'recipe'}: error: {message}", file=sys.stderr, flush=True)
            sys.exit(2)
        sys.exit(recipe_main(conf))

    return wrapper
