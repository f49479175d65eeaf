"""The one way a benchmark updates its section of BENCHMARKS.md (``--write``)."""

from __future__ import annotations

import os
import re
from typing import Optional


def write_section(path: str, section: str, body: str, notes_marker: Optional[str] = None) -> None:
    """Replace (or append) the ``section`` heading's text in the markdown file ``path`` with
    ``body``, leaving the other sections untouched. With ``notes_marker``, hand-written notes
    after that marker in the old section are kept after the new body."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    m = pattern.search(text)
    new = f"{section}\n\n{body.rstrip()}\n"
    if notes_marker is not None:
        notes = ""
        if m and notes_marker in m.group(0):
            notes = m.group(0).split(notes_marker, 1)[1].strip("\n")
        new += f"\n{notes_marker}\n" + (f"\n{notes}\n" if notes else "")
    if m:
        text = (text[: m.start()] + new + "\n" + text[m.end() :]).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + new
    with open(path, "w") as f:
        f.write(text)
