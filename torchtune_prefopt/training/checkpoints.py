"""Atomic, verifiable step checkpoints in Hugging Face format.

Layout under ``<output_dir>/checkpoints``::

    step_000040/                  # complete checkpoints only (renamed into place)
        model-00001-of-00001.safetensors, model.safetensors.index.json, config.json, ...
        adapter_model.safetensors, adapter_config.json     (LoRA)
        recipe_state.pt           # optimizer, scheduler, data position, RNG (weights_only)
        CHECKPOINT.json           # manifest: step, run identity, files: size + xxh3-128
    .tmp-step_000080/             # being written; never read, removed on the next save

A checkpoint is written into a ``.tmp-`` directory, its files are fsynced and checksummed
(xxh3-128, read back while they are still in the page cache), the manifest is written last,
and the directory is renamed into place: a reader sees a complete checkpoint or none.
:func:`latest_checkpoint` returns the newest complete one; :func:`verify_checkpoint` checks
every file's size and checksum against the manifest (a share of the files per rank, files in
parallel threads), so a truncated file or one flipped byte is named in the error.

**Run identity.** Every manifest records the run that wrote it (:class:`RunIdentity`: a
random run id and a digest of each config setting that changes what training computes). A
fresh run refuses an ``output_dir`` that holds another run's checkpoints
(:func:`check_fresh_output_dir`), a resumed run only continues a checkpoint whose settings are
its own (:func:`check_resumable`) and takes over its run id, and the final save never counts
another run's checkpoint as its own.

Weights are converted to HF format by torchtune's ``FullModelHFCheckpointer`` through
:class:`~torchtune_prefopt.models.hf_checkpoint.HFCheckpoint`;
:class:`~torchtune_prefopt.training.step_checkpointer.StepCheckpointer` is what the recipe
calls (save, resume, final).
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
from torchtune_prefopt.models.hf_checkpoint import hf_weight_files  # noqa: F401 (re-export)
from torchtune_prefopt.training.recipe_config import identity_digests, identity_keys

_BLOCK = 16 * 2**20
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


def file_checksum(path: Path) -> str:
    """xxh3-128 (hex) of a file's bytes, streamed in 16 MiB blocks (tens of GB/s: negligible
    next to writing the file; BENCHMARKS.md "Checkpoint checksums")."""
    import xxhash

    h = xxhash.xxh3_128()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _parallel(fn, items: List[Any], threads: int = 8) -> List[Any]:
    if len(items) <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def commit_checkpoint(tmp: Path, step: int, extra: Optional[Dict[str, Any]] = None) -> Path:
    """fsync and checksum every file, write the manifest, and rename ``tmp`` to ``step_<n>``;
    returns the final path."""
    paths = [f for f in sorted(tmp.rglob("*")) if f.is_file()]

    def record(f: Path) -> Dict[str, Any]:
        fsync_file(f)
        return {"size": f.stat().st_size, "xxh3_128": file_checksum(f)}

    files = {str(f.relative_to(tmp)): r for f, r in zip(paths, _parallel(record, paths))}
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
        # Hidden first (one rename), then deleted: a crash in the middle of the deletion leaves
        # a ``.tmp-`` leftover that the next save removes, never a half-deleted ``step_`` folder.
        hidden = p.parent / f".tmp-pruned-{p.name}"
        os.rename(p, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    return doomed


def read_manifest(path: Path) -> Dict[str, Any]:
    """A checkpoint's ``CHECKPOINT.json``."""
    manifest_path = path / MANIFEST
    try:
        return json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PrefOptUserError(f"checkpoint {manifest_path}: unreadable manifest ({err})") from err


def _file_problem(path: Path, rel: str, entry: Any) -> Optional[str]:
    """What is wrong with one listed file (``None``: nothing). ``entry``: the manifest's
    ``{"size", "xxh3_128"}`` (older manifests: the size alone)."""
    f = path / rel
    size, digest = (
        (entry, None) if isinstance(entry, int) else (entry.get("size"), entry.get("xxh3_128"))
    )
    if not f.is_file():
        return f"checkpoint file {f} is missing (listed in {path / MANIFEST})"
    actual = f.stat().st_size
    if actual != size:
        return f"checkpoint file {f} is truncated or damaged: {actual} bytes, manifest says {size}"
    if digest is not None and file_checksum(f) != digest:
        return f"checkpoint file {f} is damaged: its content does not match the xxh3-128 checksum recorded when it was written"
    if f.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(f), framework="pt") as sf:
                sf.keys()
        except Exception as err:  # noqa: BLE001 - any parse failure means damage
            return f"checkpoint file {f} is damaged: {' '.join(str(err).split())}"
    return None


def verify_checkpoint(path: Path, rank: int = 0, world_size: int = 1) -> Dict[str, Any]:
    """Check the files listed in the manifest: present, with the recorded size and checksum,
    safetensors headers parseable. With ``world_size > 1`` this rank checks its share (every
    ``world_size``-th file; :func:`verify_checkpoint_collective` gathers the verdicts). Files
    are read in parallel threads. Returns the manifest; raises :class:`PrefOptUserError`
    naming the first bad file."""
    manifest = read_manifest(path)
    listed = sorted(manifest.get("files", {}).items())[rank::world_size]
    problems = _parallel(lambda item: _file_problem(path, *item), listed)
    bad = [p for p in problems if p is not None]
    if bad:
        raise PrefOptUserError(bad[0])
    return manifest


def verify_checkpoint_collective(path: Path, rank: int, world_size: int) -> Dict[str, Any]:
    """:func:`verify_checkpoint` split over the ranks; every rank raises the same error."""
    error = None
    try:
        manifest = verify_checkpoint(path, rank, world_size)
    except PrefOptUserError as err:
        error, manifest = str(err), None
    if world_size > 1:
        import torch.distributed as dist

        errors: List[Optional[str]] = [None] * world_size
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise PrefOptUserError(error)
    return manifest if manifest is not None else read_manifest(path)


# --------------------------------------------------------------------------- run identity

#: config keys that change what a run computes: a checkpoint only resumes under the same ones
#: (owned by the key table; batch size and accumulation are checked as the global micro-batch)
IDENTITY_KEYS = identity_keys()


class RunIdentity:
    """A run's id (random, kept across resumes) and one digest per :data:`IDENTITY_KEYS`."""

    def __init__(self, run_id: str, settings: Dict[str, str]):
        self.run_id, self.settings = run_id, dict(settings)

    @classmethod
    def new(cls, cfg: Any, effective: Optional[Dict[str, Any]] = None) -> "RunIdentity":
        import uuid

        return cls(uuid.uuid4().hex[:12], identity_digests(cfg, effective))

    def to_json(self) -> Dict[str, Any]:
        return {"id": self.run_id, "settings": self.settings}

    @staticmethod
    def of(manifest: Dict[str, Any]) -> Optional["RunIdentity"]:
        run = manifest.get("run")
        return (
            RunIdentity(run["id"], run.get("settings", {}))
            if isinstance(run, dict) and "id" in run
            else None
        )

    def differences(self, other: "RunIdentity") -> List[str]:
        keys = sorted(set(self.settings) | set(other.settings))
        return [k for k in keys if self.settings.get(k) != other.settings.get(k)]


def content_digests(
    *, dataset: Any, tokenizer: Any, weights: List[Path], reference: Optional[List[Path]]
) -> Dict[str, str]:
    """The content part of a run's identity: the tokenized training rows (in order), the
    tokenizer's behaviour, the base weights' bytes and the reference checkpoint's (``None``:
    the base is the reference). Where the files are does not count: a moved copy is the same
    run, an appended row or replaced weights at the same path is not."""
    from torchtune_prefopt.reference.fingerprint import (
        hash_dataset,
        hash_tokenizer,
        hash_weights,
        machine_digest_memo,
    )

    memo = machine_digest_memo()
    return {
        "dataset": hash_dataset(dataset)[:16],
        "tokenizer": hash_tokenizer(tokenizer)[:16],
        "checkpointer": hash_weights(weights, digest_memo=memo)[:16],
        "ref_checkpointer": (
            "base" if reference is None else hash_weights(reference, digest_memo=memo)[:16]
        ),
    }


def previous_run(output_dir: str | Path) -> Optional[str]:
    """A description of the run whose checkpoints ``output_dir`` holds, or ``None``."""
    ckpts = list_checkpoints(output_dir)
    final = Path(output_dir) / "final"
    if not ckpts and not final.is_symlink() and not final.exists():
        return None
    if not ckpts:
        return f"a final checkpoint link ({final})"
    run = RunIdentity.of(read_manifest(ckpts[-1])) if (ckpts[-1] / MANIFEST).is_file() else None
    who = f"run {run.run_id}" if run else "another run"
    return f"{who} (newest checkpoint {ckpts[-1].name}, {len(ckpts)} checkpoint(s))"


def finished_run(output_dir: str | Path, identity: RunIdentity) -> Optional[Path]:
    """The final checkpoint of a finished run in ``output_dir`` whose settings are
    ``identity``'s (the same command run again: nothing to do), else ``None``."""
    last = latest_checkpoint(output_dir)
    final = Path(output_dir) / "final"
    if last is None or not final.is_symlink() or final.resolve() != last.resolve():
        return None
    theirs = RunIdentity.of(read_manifest(last))
    return last if theirs is not None and not theirs.differences(identity) else None


def check_fresh_output_dir(
    output_dir: str | Path, overwrite: bool, identity: Optional[RunIdentity] = None
) -> List[Path]:
    """A fresh run (no ``resume_from_checkpoint``) never adopts or overwrites another run's
    checkpoints: one line if ``output_dir`` holds some, unless ``overwrite`` (then they, the
    ``final`` link and the old metric logs are deleted; returns what was removed). The line
    suggests ``resume_from_checkpoint=True`` only where the run there has this run's settings
    (``identity``): a resume of another loss or optimizer would be refused."""
    found = previous_run(output_dir)
    if found is None:
        return []
    if not overwrite:
        differ = _settings_that_differ(output_dir, identity)
        if differ:
            raise PrefOptUserError(
                f"output_dir {output_dir} already holds {found}, a run with other settings "
                f"({', '.join(differ)} differ from this config): start this run with "
                "output_dir=<another directory>, or replace that one with overwrite_output_dir=true "
                "(deletes its checkpoints and logs)"
            )
        raise PrefOptUserError(
            f"output_dir {output_dir} already holds {found}: continue it with "
            "resume_from_checkpoint=True, start a new run with output_dir=<another directory>, or "
            "replace it with overwrite_output_dir=true (deletes its checkpoints and logs)"
        )
    out = Path(output_dir)
    doomed = [
        p
        for p in (checkpoints_root(out), out / "final", out / "logs")
        if p.is_symlink() or p.exists()
    ]
    return doomed


def _settings_that_differ(output_dir: str | Path, identity: Optional[RunIdentity]) -> List[str]:
    """The config settings (not the content digests, computed later) in which the newest
    checkpoint's run differs from ``identity``; ``[]`` when unknown."""
    last = latest_checkpoint(output_dir)
    if identity is None or last is None or not (last / MANIFEST).is_file():
        return []
    theirs = RunIdentity.of(read_manifest(last))
    if theirs is None:
        return []
    shared = set(identity.settings) & set(theirs.settings)
    return sorted(k for k in shared if identity.settings[k] != theirs.settings[k])


def remove_previous_run(paths: List[Path]) -> None:
    """Delete what :func:`check_fresh_output_dir` listed (``overwrite_output_dir=true``)."""
    for p in paths:
        if p.is_symlink() or p.is_file():
            p.unlink()
        else:
            shutil.rmtree(p, ignore_errors=True)


def check_resumable(
    checkpoint: Path,
    manifest: Dict[str, Any],
    cfg: Any,
    effective: Optional[Dict[str, Any]] = None,
) -> Optional[RunIdentity]:
    """The identity a resumed run continues: the checkpoint's, if its settings are this
    config's (else one line naming the settings that differ). ``None`` for a checkpoint
    written before run identities existed."""
    theirs = RunIdentity.of(manifest)
    if theirs is None:
        return None
    differs = theirs.differences(RunIdentity("", identity_digests(cfg, effective)))
    if differs:
        raise PrefOptUserError(
            f"resume: {checkpoint} belongs to run {theirs.run_id}, trained with other settings "
            f"({', '.join(_what_differs(k) for k in differs)} differ from this config); resume "
            "with that run's settings and inputs, or start a new run (output_dir=<another "
            "directory> or overwrite_output_dir=true)"
        )
    return theirs


def _what_differs(key: str) -> str:
    from torchtune_prefopt.training.recipe_config import content_identity_keys

    what = {
        "dataset": "the dataset's rows",
        "tokenizer": "the tokenizer",
        "checkpointer": "the base weights",
        "ref_checkpointer": "the reference weights",
    }
    return f"{key} ({what[key]})" if key in content_identity_keys() and key in what else key


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
    """``torch.save`` the recipe state; a failed write is an ``OSError`` like any other
    (torch raises ``RuntimeError('[enforce fail at inline_container.cc] ...')`` when the disk
    fills: told apart from other failures by the free space left, under 256 MiB)."""
    import errno

    path = tmp / RECIPE_STATE
    try:
        torch.save(state, path)
    except RuntimeError as err:
        code = errno.ENOSPC if shutil.disk_usage(tmp).free < 256 * 2**20 else errno.EIO
        raise OSError(
            code, f"{os.strerror(code)} ({' '.join(str(err).split())})", str(path)
        ) from err


def load_adapter_weights(path: Path) -> Dict[str, torch.Tensor]:
    """LoRA adapter weights (torchtune key names) of a step checkpoint, ``weights_only``."""
    f = path / "adapter_model.pt"
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise PrefOptUserError(f"checkpoint file {f} cannot be loaded: {err}") from err
