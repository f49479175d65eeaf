"""Atomic, verifiable step checkpoints in Hugging Face format.

Layout under ``<output_dir>/checkpoints``::

    step_000040/                  # complete checkpoints only (renamed into place)
        model-00001-of-00001.safetensors, model.safetensors.index.json, config.json, ...
        adapter_model.safetensors, adapter_config.json     (LoRA)
        recipe_state.pt           # optimizer, scheduler, data position, RNG (weights_only)
        CHECKPOINT.json           # manifest: step, files and their sizes
    .tmp-step_000080/             # being written; never read, removed on the next save

A checkpoint is written into a ``.tmp-`` directory, its files are fsynced, the manifest is
written last, and the directory is renamed into place: a reader sees a complete checkpoint or
none. :func:`latest_checkpoint` returns the newest complete one; :func:`verify_checkpoint`
checks every file against the manifest so a truncated or damaged file is named in the error.

Weights are converted to HF format by torchtune's ``FullModelHFCheckpointer`` (see
:func:`write_hf_weights`; that is the one place we reach into its private ``_output_dir``,
because 0.6.1 can only write to ``<output_dir>/epoch_<n>``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.files import fsync_dir, fsync_file

CHECKPOINTS_DIRNAME = "checkpoints"
MANIFEST = "CHECKPOINT.json"
RECIPE_STATE = "recipe_state.pt"
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIRNAME


def step_dirname(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(output_dir: str | Path) -> List[Path]:
    """Complete step checkpoints (those with a manifest), oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / MANIFEST).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def begin_checkpoint(output_dir: str | Path, step: int) -> Path:
    """Create (fresh) the temporary directory a checkpoint is written into."""
    root = checkpoints_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{step_dirname(step)}"
    tmp.mkdir()
    return tmp


def commit_checkpoint(tmp: Path, step: int, extra: Optional[Dict[str, Any]] = None) -> Path:
    """fsync, write the manifest, and rename ``tmp`` to ``step_<n>``; returns the final path."""
    files = {}
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            fsync_file(f)
            files[str(f.relative_to(tmp))] = f.stat().st_size
    manifest = {"step": step, "files": files, **(extra or {})}
    with open(tmp / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(tmp)
    final = tmp.parent / step_dirname(step)
    if final.exists():
        # Same step saved again (e.g. pre-emption right after a periodic save): swap safely.
        old = tmp.parent / f".old-{step_dirname(step)}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(tmp.parent)
    return final


def link_final(output_dir: str | Path, checkpoint: Path) -> Path:
    """Point ``<output_dir>/final`` at ``checkpoint`` (a relative symlink, replaced atomically)."""
    output_dir = Path(output_dir)
    link, tmp_link = output_dir / "final", output_dir / ".final.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(os.path.relpath(checkpoint, output_dir), tmp_link)
    os.replace(tmp_link, link)
    return link


def prune_checkpoints(output_dir: str | Path, keep_last_n: Optional[int]) -> List[Path]:
    """Delete all but the newest ``keep_last_n`` complete checkpoints; returns those removed."""
    if not keep_last_n:
        return []
    ckpts = list_checkpoints(output_dir)
    doomed = ckpts[:-keep_last_n]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def verify_checkpoint(path: Path) -> Dict[str, Any]:
    """Check every file listed in the manifest exists with its recorded size.

    Safetensors headers are parsed too. Raises :class:`PrefOptUserError` naming the file.
    """
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PrefOptUserError(f"checkpoint {manifest_path}: unreadable manifest ({err})") from err
    for rel, size in manifest.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            raise PrefOptUserError(f"checkpoint file {f} is missing (listed in {manifest_path})")
        actual = f.stat().st_size
        if actual != size:
            raise PrefOptUserError(
                f"checkpoint file {f} is truncated or damaged: {actual} bytes, manifest says {size}"
            )
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="pt") as sf:
                    sf.keys()
            except Exception as err:  # noqa: BLE001 - any parse failure means damage
                raise PrefOptUserError(f"checkpoint file {f} is damaged: {err}") from err
    return manifest


def load_recipe_state(path: Path) -> Dict[str, Any]:
    """Load ``recipe_state.pt`` with ``weights_only=True`` (no pickle code execution)."""
    f = path / RECIPE_STATE
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        # torch's weights_only message is long and suggests weights_only=False: name the
        # refused object instead (this recipe only writes tensors and plain containers).
        refused = re.search(r"(?i)unsupported (GLOBAL \S+)", str(err))
        if refused:
            raise PrefOptUserError(
                f"checkpoint file {f} cannot be loaded: it holds an object that weights_only=True "
                f"refuses to unpickle ({refused.group(1)}); this recipe never writes one, so the file "
                "was not written by it or was modified: do not load it with weights_only=False"
            ) from None
        raise PrefOptUserError(f"checkpoint file {f} cannot be loaded: {err}") from err


def save_recipe_state(tmp: Path, state: Dict[str, Any]) -> None:
    torch.save(state, tmp / RECIPE_STATE)


def write_hf_weights(
    checkpointer: Any, state_dict: Dict[str, Any], dest: Path, adapter_only: bool = False
) -> None:
    """Write a torchtune checkpoint dict (MODEL_KEY, optional ADAPTER_KEY/ADAPTER_CONFIG)
    as HF files into ``dest`` through ``checkpointer`` (a ``FullModelHFCheckpointer``).

    torchtune 0.6.1 always writes to ``<checkpointer._output_dir>/epoch_<n>``; we point its
    output dir at a scratch folder inside ``dest`` for the call and move the files up.
    """
    scratch = dest / ".hf_scratch"
    original_output_dir = checkpointer._output_dir
    checkpointer._output_dir = scratch
    try:
        checkpointer.save_checkpoint(
            dict(state_dict), epoch=0, intermediate_checkpoint=False, adapter_only=adapter_only
        )
    finally:
        checkpointer._output_dir = original_output_dir
    written = scratch / "epoch_0"
    for f in written.iterdir():
        shutil.move(str(f), str(dest / f.name))
    shutil.rmtree(scratch, ignore_errors=True)


def hf_weight_files(path: Path) -> List[str]:
    """The model weight files of an HF checkpoint directory, sorted."""
    files = sorted(p.name for p in path.glob("*.safetensors") if not p.name.startswith("adapter"))
    if not files:
        files = sorted(
            p.name
            for p in path.glob("*.bin")
            if not p.name.startswith("adapter") and p.name != "training_args.bin"
        )
    return files


def load_adapter_weights(path: Path) -> Dict[str, torch.Tensor]:
    """LoRA adapter weights (torchtune key names) of a step checkpoint, ``weights_only``."""
    f = path / "adapter_model.pt"
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise PrefOptUserError(f"checkpoint file {f} cannot be loaded: {err}") from err


def load_model_state_dict(checkpointer: Any, key: str) -> Dict[str, torch.Tensor]:
    """``checkpointer.load_checkpoint()[MODEL_KEY]``; a missing, truncated or damaged file is a
    one-line :class:`PrefOptUserError` naming the config ``key`` and the file (torchtune raises
    ``ValueError('Unable to load checkpoint from <file>')`` with the real error as its cause)."""
    from torchtune import training

    try:
        return checkpointer.load_checkpoint()[training.MODEL_KEY]
    except (ValueError, OSError, RuntimeError) as err:
        cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
        raise PrefOptUserError(f"{key}: {' '.join(str(err).split())}{cause}") from err


def check_state_dict(
    model: torch.nn.Module, sd: Dict[str, torch.Tensor], source: Any, strict_keys: bool
) -> None:
    """Compare a full state dict with ``model``'s parameter shapes (and, with ``strict_keys``,
    its names) before loading it: a mismatch is one line naming the weight and ``source``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, v in sd.items():
        if k in expected and tuple(v.shape) != expected[k]:
            raise PrefOptUserError(
                f"checkpoint {source}: weight '{k}' has shape {tuple(v.shape)}, the model expects {expected[k]}"
            )
    if strict_keys:
        missing = [k for k in expected if k not in sd]
        if missing:
            raise PrefOptUserError(
                f"checkpoint {source}: missing weight '{missing[0]}' ({len(missing)} missing)"
            )
