"""One run per ``output_dir``: an exclusive lock held for the run's lifetime.

The lock is the file ``<output_dir>/.prefopt.lock``, created with ``O_CREAT | O_EXCL``: an
atomic create-if-absent on local filesystems and on the shared ones clusters use (NFSv3 and
later, Lustre, GPFS, BeeGFS), where ``flock``/``fcntl`` locks are either node-local or
depend on a lock daemon. It holds the holder's host, pid, process start time and start date,
so a second run refuses with one line naming the holder.

A lock whose holder is gone is *stale*: on the same host, a pid that is not running, or one
that is running but started at another time (a reused pid), is detected and the lock is
taken over by an atomic rename (of two runs taking over at once, one rename wins); a lock
held from another host cannot be checked from here and the message says how to remove it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

from torchtune_prefopt.errors import PrefOptUserError

__all__ = ["LOCK_NAME", "OutputDirLock"]

LOCK_NAME = ".prefopt.lock"


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (Linux ``/proc``), ``None`` where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: starttime, after "pid (comm)"


def _alive(holder: Dict[str, Any]) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: running
    started = holder.get("process_start")
    return started is None or _process_start(pid) in (None, started)


class OutputDirLock:
    """The lock on one ``output_dir`` (see the module docstring)."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.token: Optional[str] = None

    def _info(self) -> Dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "token": self.token,
        }

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._info(), f)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            # a full or read-only disk: leave nothing behind (an empty lock file would read
            # as a lock held by an unknown run)
            self.path.unlink(missing_ok=True)
            raise
        return True

    def holder(self) -> Optional[Dict[str, Any]]:
        """The lock file's content (``{}`` if unreadable, ``None`` if there is no lock)."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        """Take the lock, or one :class:`PrefOptUserError` line naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.token = uuid.uuid4().hex
        for _ in range(3):
            if self._create():
                return
            holder = self.holder()
            if holder is None:
                continue  # released meanwhile
            here = holder.get("host") == socket.gethostname()
            if here and not _alive(holder):
                stale = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
                try:
                    os.rename(self.path, stale)  # atomic: one of two taking over wins
                except FileNotFoundError:
                    continue
                stale.unlink(missing_ok=True)
                continue
            self.token = None
            who = (
                f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
                f"started {holder.get('started', '?')}"
            )
            fix = (
                "wait for it to finish or use another output_dir"
                if here
                else f"wait for it, use another output_dir, or, if that process is gone, delete {self.path}"
            )
            raise PrefOptUserError(
                f"output_dir {self.path.parent} is in use by another run ({who}): {fix}"
            )
        raise PrefOptUserError(
            f"output_dir {self.path.parent}: could not take the lock {self.path}"
        )

    def release(self) -> None:
        """Remove the lock if this process holds it (idempotent)."""
        if self.token is None:
            return
        holder = self.holder()
        if holder and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.token = None
