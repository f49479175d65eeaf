"""User-facing errors.

A :class:`PrefOptUserError` is a problem with the user's config, data or checkpoint. The
recipe reports it as one line (``error: <message>``), without a stack trace, and exits with
status 2 before any compute is spent. Set ``PREFOPT_DEBUG=1`` to see the traceback anyway.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

#: exit status of a run stopped because a write failed (disk full, read-only folder): nothing
#: saved before was lost (see :class:`WriteFailed`)
EXIT_WRITE_FAILED = 4


class WriteFailed(Exception):
    """A write the run needs failed (disk full, read-only, quota): one ``error:`` line naming
    the path, exit :data:`EXIT_WRITE_FAILED`; what was saved before is intact."""


def debug_enabled() -> bool:
    """``PREFOPT_DEBUG`` set to anything but empty, ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get("PREFOPT_DEBUG", "").strip().lower() not in (
        "",
        "0",
        "false",
        "no",
        "off",
    )


class PrefOptUserError(ValueError):
    """A bad config key, data row or checkpoint: reported as one line, no traceback."""


class AlreadyFinished(Exception):
    """``output_dir`` already holds this very run, finished: nothing to do. Reported as one
    line on stdout, exit status 0 (running the same command twice is not an error)."""


def report_user_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for recipe entry points: turn :class:`PrefOptUserError` into a one-line exit."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except AlreadyFinished as done:
            if os.environ.get("RANK", "0") == "0":
                print(" ".join(str(done).split("\n")), flush=True)
            sys.exit(0)
        except PrefOptUserError as err:
            if debug_enabled():
                raise
            rank = os.environ.get("RANK", "0")
            if rank == "0":
                msg = " ".join(str(err).split("\n"))
                print(f"error: {msg}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
