"""Start-up checks of a recipe config: everything that can be known wrong before any file is
written, any weight is loaded or any step runs. Each failure is one
:class:`~torchtune_prefopt.errors.PrefOptUserError` line that names the config key.

torchtune's ``config.instantiate`` only finds out about a bad ``_component_`` (an import
error, an unknown or missing keyword argument) when the object is built, which in a recipe is
after other heavy work, and then with a traceback. :func:`check_component` imports the target
and compares the config's keys with its signature up front.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.models.hf.builder import check_lora_attn_modules

__all__ = [
    "check_component",
    "check_interpolations",
    "check_lora_settings",
    "check_metric_logger_installed",
    "check_optimizer_values",
    "check_output_dir",
    "check_paths_exist",
    "component_target",
]

#: the modules torchtune's metric loggers import when built (not dependencies of torchtune)
_LOGGER_PACKAGES = {
    "WandBLogger": "wandb",
    "TensorBoardLogger": "tensorboard",
    "CometLogger": "comet_ml",
    "MLFlowLogger": "mlflow",
}


def _plain(node: Any) -> Any:
    from torchtune_prefopt.plain import to_plain

    return to_plain(node, resolve=True)


def component_target(node: Mapping[str, Any], key: str) -> Any:
    """The object ``node["_component_"]`` names, imported; one line naming ``key`` if it
    cannot be imported."""
    from torchtune.config._utils import _get_component_from_path

    path = node.get("_component_")
    if not isinstance(path, str) or not path:
        raise PrefOptUserError(f"{key}._component_ must be a dotted import path, got {path!r}")
    try:
        return _get_component_from_path(path)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's path
        cause = err.__cause__ or err
        reason = " ".join(str(cause).split())
        raise PrefOptUserError(
            f"{key}._component_: cannot import '{path}' ({type(cause).__name__}: {reason})"
        ) from None


def check_component(
    node: Any, key: str, *, positional: int = 0, injected: Iterable[str] = ()
) -> Any:
    """Import ``node``'s ``_component_`` and check its keyword arguments; returns the target.

    ``positional``: leading positional arguments the recipe passes (an optimizer's
    parameters); ``injected``: keyword arguments the recipe passes (a dataset's
    ``tokenizer``). A config key the target does not accept, or a required argument nobody
    gives, is one line naming ``key``.
    """
    node = _plain(node)
    if not isinstance(node, Mapping) or "_component_" not in node:
        raise PrefOptUserError(f"{key} must be a mapping with a _component_, got {node!r}")
    target = component_target(node, key)
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature: nothing to compare
        return target
    params = list(sig.parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    given = {k for k in node if k != "_component_"}
    injected = set(injected)
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params)
    if not accepts_any:
        accepted = {p.name for p in named[positional:]}
        unknown = sorted(given - accepted)
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(accepted), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise PrefOptUserError(
                f"{key}.{unknown[0]}: {node['_component_']} does not accept '{unknown[0]}'{hint}; "
                f"accepted: {', '.join(sorted(accepted)) or '(none)'}"
            )
    missing = [
        p.name for p in named[positional:]
        if p.default is p.empty and p.name not in given and p.name not in injected
    ]  # fmt: skip
    if missing:
        raise PrefOptUserError(
            f"{key}: {node['_component_']} needs '{missing[0]}' (missing from the config)"
        )
    return target


def check_interpolations(cfg: Any) -> None:
    """Every ``${...}`` interpolation of the config resolves."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(err).strip().splitlines()[0]  # OmegaConf appends "full_key: ..." lines
        raise PrefOptUserError(f"config key '{key}': {msg}") from None


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def check_optimizer_values(node: Any, key: str = "optimizer") -> None:
    """The usual numeric arguments of torch's optimizers are in range (torch itself accepts
    ``lr=0``, ``nan`` or ``inf`` and trains nothing, or diverges, without a word)."""
    node = _plain(node) or {}
    rules = {
        "lr": (lambda v: v > 0, "> 0"),
        "weight_decay": (lambda v: v >= 0, ">= 0"),
        "eps": (lambda v: v > 0, "> 0"),
        "momentum": (lambda v: v >= 0, ">= 0"),
    }
    for name, (ok, want) in rules.items():
        if name not in node:
            continue
        v = _number(node[name])
        if v is None or not math.isfinite(v) or not ok(v):
            raise PrefOptUserError(
                f"{key}.{name} must be a finite number {want}, got {node[name]!r}"
            )
    if "betas" in node:
        betas = node["betas"]
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(
            (b := _number(x)) is not None and 0.0 <= b < 1.0 for x in betas
        )):  # fmt: skip
            raise PrefOptUserError(f"{key}.betas must be two numbers in [0, 1), got {betas!r}")


def check_lora_settings(node: Any, key: str = "model") -> None:
    """A ``lora_*`` model builder's settings: known attention modules, positive rank/alpha."""
    node = _plain(node) or {}
    if "lora_attn_modules" in node:
        check_lora_attn_modules(node["lora_attn_modules"], key)
    if "lora_rank" in node:
        r = node["lora_rank"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise PrefOptUserError(f"{key}.lora_rank must be an integer >= 1, got {r!r}")
    if "lora_alpha" in node:
        a = _number(node["lora_alpha"])
        if a is None or not math.isfinite(a) or a <= 0:
            raise PrefOptUserError(
                f"{key}.lora_alpha must be a number > 0, got {node['lora_alpha']!r}"
            )
    if "lora_dropout" in node:
        d = _number(node["lora_dropout"])
        if d is None or not 0.0 <= d < 1.0:
            raise PrefOptUserError(
                f"{key}.lora_dropout must be a number in [0, 1), got {node['lora_dropout']!r}"
            )
    if node.get("use_dora") and node.get("quantize_base"):
        raise PrefOptUserError(
            f"{key}: use_dora with quantize_base is not supported by this recipe"
        )


def check_metric_logger_installed(node: Any, key: str = "metric_logger") -> None:
    """torchtune's W&B / TensorBoard / Comet / MLflow loggers import their package when built."""
    import importlib.util

    node = _plain(node) or {}
    name = str(node.get("_component_", "")).rsplit(".", 1)[-1]
    package = _LOGGER_PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise PrefOptUserError(
            f"{key}: {node['_component_']} needs the '{package}' package, which is not installed "
            f"(pip install {package.replace('_', '-')}), or use torchtune.training.metric_logging.DiskLogger"
        )


def _download_hint(path: Path) -> str:
    return (
        "; did you run `tune download <model> --output-dir <dir>` for this config? (the packaged "
        "configs' headers have the exact command)"
    )


def check_paths_exist(node: Any, key: str, *, names: Sequence[str] = ()) -> None:
    """The files a component will read exist: arguments named ``path``, ``*_path`` or
    ``*_file`` (tokenizers), and a torchtune checkpointer's ``checkpoint_dir`` and
    ``checkpoint_files``. A checkpointer given as a factory (e.g. the tiny model's, which
    creates its checkpoint on first use) is not checked."""
    node = _plain(node) or {}
    for arg, value in node.items():
        is_path = arg == "path" or arg.endswith(("_path", "_file")) or arg in names
        if is_path and isinstance(value, str) and value and not Path(value).expanduser().exists():
            raise PrefOptUserError(
                f"{key}.{arg}: {value} does not exist" + _download_hint(Path(value).parent)
            )
    if "checkpoint_dir" not in node:
        return
    target = component_target(node, key)
    if not (
        inspect.isclass(target) and target.__module__.startswith("torchtune.training.checkpointing")
    ):
        return
    ckpt_dir = Path(str(node["checkpoint_dir"])).expanduser()
    if not ckpt_dir.is_dir():
        raise PrefOptUserError(
            f"{key}.checkpoint_dir: {ckpt_dir} is not a directory" + _download_hint(ckpt_dir)
        )
    _check_not_adapter_only(ckpt_dir, key)
    files = node.get("checkpoint_files")
    if isinstance(files, (list, tuple)):
        for f in files:
            if not (ckpt_dir / str(f)).is_file():
                raise PrefOptUserError(
                    f"{key}.checkpoint_files: {ckpt_dir / str(f)} does not exist"
                    + _download_hint(ckpt_dir)
                )
    if not (ckpt_dir / "config.json").is_file() and target.__name__ == "FullModelHFCheckpointer":
        raise PrefOptUserError(
            f"{key}.checkpoint_dir: {ckpt_dir} has no config.json (a Hugging Face model folder "
            "holds one next to its weights)" + _download_hint(ckpt_dir)
        )


def _check_not_adapter_only(ckpt_dir: Path, key: str) -> None:
    """A periodic LoRA step checkpoint holds the adapter only (its base is the run's input
    checkpoint): as a starting point it would be a different model."""
    import json

    manifest = ckpt_dir / "CHECKPOINT.json"
    try:
        info = json.loads(manifest.read_text()) if manifest.is_file() else {}
    except (OSError, ValueError):
        return
    if info.get("model_weights", True):
        return
    final = ckpt_dir.parent.parent / "final"
    raise PrefOptUserError(
        f"{key}.checkpoint_dir: {ckpt_dir} is a LoRA step checkpoint that holds only the adapter "
        f"(adapter_model.safetensors), not a model; to continue that run, resume it in its own "
        f"output_dir ({ckpt_dir.parent.parent}) with resume_from_checkpoint=True and the same "
        f"global batch; to start a new run from its weights, point {key}.checkpoint_dir at a "
        f"checkpoint with merged weights (that run's {final}, written at its end)"
    )


def check_output_dir(path: Any) -> None:
    """``output_dir`` is a directory, or can be created: its nearest existing ancestor is a
    writable directory (tried with a temporary file there, removed at once; nothing is
    created inside ``output_dir``)."""
    p = Path(str(path)).expanduser()
    if p.exists() and not p.is_dir():
        raise PrefOptUserError(f"output_dir: {p} exists and is not a directory")
    ancestor = p if p.exists() else next((a for a in p.absolute().parents if a.exists()), None)
    if ancestor is None or not ancestor.is_dir():
        raise PrefOptUserError(f"output_dir: {p} cannot be created ({ancestor} is not a directory)")
    try:
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".prefopt-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        what = "is not writable" if p.exists() else f"cannot be created in {ancestor}"
        raise PrefOptUserError(f"output_dir: {p} {what} ({err.strerror})") from None
