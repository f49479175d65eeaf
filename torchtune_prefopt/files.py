"""Durable file writes: fsync helpers and an atomic whole-file write.

One owner for "make this write survive a crash": step checkpoints
(:mod:`torchtune_prefopt.training.checkpoints`) and the reference log-prob cache
(:mod:`torchtune_prefopt.reference.store`) both use these. A reader never sees a partly
written file: the data goes to a temporary sibling, is fsynced, renamed over the target, and
the directory entry is fsynced.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

__all__ = ["atomic_write_bytes", "fsync_dir", "fsync_file"]

PathLike = Union[str, os.PathLike]


def fsync_file(path: PathLike) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """Flush a directory's entries (renames, new files) to disk; best effort (some file
    systems refuse to open or fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of
    ``data``: temporary sibling, fsync, rename, fsync of the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
