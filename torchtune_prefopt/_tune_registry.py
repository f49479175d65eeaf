"""Make ``tune ls`` / ``tune cp`` / ``tune run`` know our recipes and configs.

Why this exists: torchtune 0.6.1 (its final release) has no plugin hook for recipes. Its
CLI only knows the hard-coded list ``torchtune._recipe_registry._ALL_RECIPES``. ``tune run``
with an unregistered recipe name runs ``python -m NAME`` relative to the current directory,
and an unregistered ``--config`` is taken as a path relative to the current directory, so
``tune run prefopt_distributed --config tiny/dpo`` cannot work without registration.

How: the wheel ships ``torchtune_prefopt_registry.pth`` (see pyproject.toml and
hatch_build.py), which calls :func:`install` at every interpreter start-up. :func:`install`
must be nearly free, so it imports nothing heavy (no torch, no torchtune): it puts a tiny
finder first on ``sys.meta_path`` that matches exactly one module name,
``torchtune._recipe_registry``. When (and only when) that module is imported, the finder
wraps its loader; right after the module has executed, :func:`_register` appends our
``Recipe`` entries (``prefopt_distributed``; ``prefopt_compare`` when its file exists), each
listing every config from :func:`torchtune_prefopt._config.available_configs` (packaged and
entry-point configs), with ABSOLUTE file paths and ``supports_distributed=True``. The CLI
builds paths as ``ROOT / "recipes" / file_path``; pathlib returns an absolute right operand
unchanged, so absolute paths make ls/cp/run work from any directory. The finder removes
itself once it has fired. If torchtune's registry is already imported when :func:`install`
runs, it is patched directly.

The same finder also wraps ``torchtune._cli.run.Run._run_distributed`` (:func:`_wrap_launcher`)
for our recipes: torchtune launches ``--nproc_per_node`` runs through torchrun's elastic agent,
which turns a worker's clean exit 2 (a one-line user error, already printed by rank 0) into a
``ChildFailedError`` traceback and exit status 1. The wrapper exits with the workers' own status
(2: config/data error, 3: a numeric guard stopped the run) instead, and drops the agent's
"failed (exitcode: 2)" log line, so the one ``error:`` line is what the user sees.

The finder also sees ``torchao`` being imported (by ``import torchtune``) and, right before,
filters the one warning torchao logs for the torch/torchao pair this package pins
(:class:`_DropTorchaoVersionNotice`), so every run does not start with a line about C++
extensions the package does not use.

This is the ONE place where torchtune is touched. Everything is defensive: a missing attribute
or any exception means we silently skip (torchtune works as without us), and entries are added
at most once per process.
"""

from __future__ import annotations

import sys

_TARGET = "torchtune._recipe_registry"
_LAUNCHER = "torchtune._cli.run"
#: exit statuses our recipes use for a reported error (2: config/data, 3: numeric guard)
_REPORTED_EXIT = (2, 3)
_MARK = "_torchtune_prefopt_registered"
_FINDER_MARK = "_torchtune_prefopt_finder"

# (recipe name, file name in our recipes/ folder, registered even if the file is missing).
# prefopt_distributed is THE recipe and always ships; prefopt_compare only when present.
_RECIPES = (
    ("prefopt_distributed", "prefopt_distributed.py", True),
    ("prefopt_compare", "prefopt_compare.py", False),
)


def is_compare_config(name: str) -> bool:
    """Configs named ``<family>/*compare*`` or ``<family>/*frontier*`` drive prefopt_compare;
    all others prefopt_distributed (so ``tune ls`` lists each config once, under the recipe
    that runs it)."""
    stem = name.rsplit("/", 1)[-1]
    return "compare" in stem or "frontier" in stem


def _package_dir():
    from pathlib import Path

    return Path(__file__).absolute().parent


def _config_entries(config_cls):
    """torchtune ``Config`` objects for all our config names, absolute paths."""
    from torchtune_prefopt import _config

    try:
        configs = _config.available_configs()
    except _config.ConfigNameClashError as exc:
        # Still register our own configs; the recipe reports the clash when it matters.
        print(f"torchtune-prefopt: warning: {exc}", file=sys.stderr)
        configs = _config._yaml_files(_config.packaged_configs_dir())
    return [config_cls(name=name, file_path=str(path)) for name, path in configs.items()]


def _register(module) -> bool:
    """Append our recipes to ``module._ALL_RECIPES``. True if registered (now or before)."""
    try:
        if getattr(module, _MARK, False):
            return True
        all_recipes = getattr(module, "_ALL_RECIPES", None)
        recipe_cls = getattr(module, "Recipe", None)
        config_cls = getattr(module, "Config", None)
        if not isinstance(all_recipes, list) or recipe_cls is None or config_cls is None:
            return False
        recipes_dir = _package_dir() / "recipes"
        configs = _config_entries(config_cls)
        existing = {getattr(r, "name", None) for r in all_recipes}
        new = []
        for name, filename, always in _RECIPES:
            path = recipes_dir / filename
            if name in existing or not (always or path.is_file()):
                continue
            is_compare = name == "prefopt_compare"
            mine = [c for c in configs if is_compare_config(c.name) == is_compare]
            new.append(
                recipe_cls(
                    name=name,
                    file_path=str(path),
                    configs=mine,
                    supports_distributed=True,
                )
            )
        all_recipes.extend(new)
        setattr(module, _MARK, True)
        return True
    except Exception:
        return False


class _PatchingLoader:
    """Delegates to the real loader; registers our recipes after the module has executed."""

    def __init__(self, loader, spec):
        self._loader = loader
        self._spec = spec

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        try:
            before = _BEFORE.get(module.__name__)
            if before is not None:
                before()
            self._loader.exec_module(module)
        finally:
            # Hide ourselves: the module looks exactly as if imported normally.
            try:
                module.__loader__ = self._loader
                self._spec.loader = self._loader
            except Exception:
                pass
            _PENDING.discard(module.__name__)
            if not _PENDING:
                _uninstall_finders()
        _PATCHES[module.__name__](module)

    def __getattr__(self, name):
        loader = self.__dict__.get("_loader")
        if loader is None:
            raise AttributeError(name)
        return getattr(loader, name)


class _RegistryFinder:
    """``sys.meta_path`` finder that only ever answers for the modules we patch
    (``torchtune._recipe_registry`` and ``torchtune._cli.run``), once each."""

    _torchtune_prefopt_finder = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _PENDING:
            return None
        try:
            spec = None
            for finder in list(sys.meta_path):
                if finder is self or getattr(finder, _FINDER_MARK, False):
                    continue
                find_spec = getattr(finder, "find_spec", None)
                if find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
            if spec is None or not hasattr(spec.loader, "exec_module"):
                return None  # let the normal machinery report/handle it
            spec.loader = _PatchingLoader(spec.loader, spec)
            return spec
        except Exception:
            return None

    def invalidate_caches(self):
        pass


def _uninstall_finders() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, _FINDER_MARK, False)]


def _ours(recipe: object) -> bool:
    from pathlib import Path

    try:
        return Path(str(recipe)).resolve().parent == (_package_dir() / "recipes").resolve()
    except Exception:
        return False


class _DropReportedFailures:
    """Logging filter for torchrun's agent: drops its "failed (exitcode: 2)" line."""

    def filter(self, record) -> bool:
        try:
            return not (
                str(record.msg).startswith("failed (exitcode") and record.args[0] in _REPORTED_EXIT
            )
        except Exception:
            return True


def _reported_exit_code(err: BaseException):
    """The exit status of the first failed worker, if it is one our recipes report with."""
    try:
        _, failure = err.get_first_failure()
        return failure.exitcode if failure.exitcode in _REPORTED_EXIT else None
    except Exception:
        return None


def _wrap_launcher(module) -> None:
    """Wrap ``Run._run_distributed`` (see the module docstring)."""
    try:
        run_cls = module.Run
        original = run_cls._run_distributed
        if getattr(original, _MARK, False):
            return

        def _run_distributed(self, args, is_builtin):
            if not _ours(getattr(args, "recipe", None)):
                return original(self, args, is_builtin)
            import logging

            agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
            quiet = _DropReportedFailures()
            agent_log.addFilter(quiet)
            try:
                return original(self, args, is_builtin)
            except Exception as err:  # torchrun's ChildFailedError
                code = _reported_exit_code(err)
                if code is None:
                    raise
                sys.exit(code)
            finally:
                agent_log.removeFilter(quiet)

        setattr(_run_distributed, _MARK, True)
        run_cls._run_distributed = _run_distributed
    except Exception:
        pass


class _DropTorchaoVersionNotice:
    """Logging filter for the ``torchao`` logger: drops the one warning it prints at import
    for the torch/torchao pair this package pins ("Skipping import of cpp extensions due to
    incompatible torch version ...": torchao 0.15 runs its pure-Python paths on torch 2.13,
    which is what the package uses; torchao 0.16+ would break ``import torchtune``)."""

    def filter(self, record) -> bool:
        try:
            return not str(record.msg).startswith(
                "Skipping import of cpp extensions due to incompatible torch version"
            )
        except Exception:
            return True


def _quiet_torchao() -> None:
    import logging

    logging.getLogger("torchao").addFilter(_DropTorchaoVersionNotice())


_PATCHES = {_TARGET: _register, _LAUNCHER: _wrap_launcher, "torchao": lambda module: None}
#: run right before the module executes
_BEFORE = {"torchao": _quiet_torchao}
_PENDING = set()


def install() -> None:
    """Arrange for our recipes/configs to appear in torchtune's recipe registry, and for
    ``tune run --nproc_per_node`` to keep our recipes' exit status.

    Cheap and idempotent; never raises.
    """
    try:
        for name, patch in _PATCHES.items():
            module = sys.modules.get(name)
            if module is not None:
                patch(module)
            else:
                _PENDING.add(name)
        if not _PENDING or any(getattr(f, _FINDER_MARK, False) for f in sys.meta_path):
            return
        sys.meta_path.insert(0, _RegistryFinder())
    except Exception:
        pass
