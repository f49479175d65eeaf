"""What checksumming a checkpoint costs next to writing it (not a test).

A checkpoint save writes each shard (``safetensors`` via torchtune's checkpointer), fsyncs it,
and then ``commit_checkpoint`` reads it back from the page cache to record its xxh3-128. This
script times the three parts on shards of random bytes (the content does not matter to either
cost), one after the other in one run:

  write+fsync   open/write/fsync of every shard (what the save costs without checksums)
  checksum      commit_checkpoint's read-back + xxh3-128, files in parallel threads
  verify        verify_checkpoint on resume (size + checksum + safetensors header), all files
                on one rank, and the share of one rank of 8

Wall and CPU seconds side by side (shared machine). Usage::

    python benchmarks/bench_checkpoint_checksum.py --shards 4 --shard-mib 512 [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import tempfile
import time
from pathlib import Path

from _markdown import write_section  # benchmarks/ is the script's directory  # noqa: E402

SECTION = "## Checkpoint checksums"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(fn):
    t, c = time.perf_counter(), _cpu()
    out = fn()
    return out, time.perf_counter() - t, _cpu() - c


def _write_shards(d: Path, shards: int, mib: int) -> None:
    block = os.urandom(16 * 2**20)
    header = json.dumps(
        {"w": {"dtype": "U8", "shape": [mib * 2**20], "data_offsets": [0, mib * 2**20]}}
    ).encode()
    for i in range(shards):
        with open(d / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            for _ in range(mib // 16):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--shard-mib", type=int, default=512)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--write", metavar="MARKDOWN", help=f"replace the '{SECTION}' section")
    a = p.parse_args()

    from torchtune_prefopt.training import checkpoints as ckpt

    root = Path(tempfile.mkdtemp(dir=a.dir, prefix="bench_ckpt_"))
    try:
        tmp = ckpt.begin_checkpoint(root, 1)
        _, w_wall, w_cpu = _timed(lambda: _write_shards(tmp, a.shards, a.shard_mib))
        # commit = fsync (already done: cheap) + checksum read-back + manifest + rename
        final, c_wall, c_cpu = _timed(lambda: ckpt.commit_checkpoint(tmp, 1))
        _, v_wall, v_cpu = _timed(lambda: ckpt.verify_checkpoint(final))
        _, s_wall, s_cpu = _timed(lambda: ckpt.verify_checkpoint(final, rank=0, world_size=8))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    gib = a.shards * a.shard_mib / 1024
    rows = [
        ("write + fsync (the save itself)", w_wall, w_cpu),
        ("commit: checksum read-back + manifest", c_wall, c_cpu),
        ("verify on resume, all files (1 rank)", v_wall, v_cpu),
        ("verify on resume, one rank's share of 8", s_wall, s_cpu),
    ]
    lines = [
        f"{a.shards} shards x {a.shard_mib} MiB ({gib:.1f} GiB) of random bytes on this machine's "
        f"disk ({os.cpu_count()} CPU cores, page cache warm after the write). Command: "
        f"`python benchmarks/bench_checkpoint_checksum.py --shards {a.shards} --shard-mib {a.shard_mib}`.",
        "",
        "| part | wall s | CPU s | GiB/s (wall) | vs write |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, wall, cpu in rows:
        lines.append(
            f"| {name} | {wall:.2f} | {cpu:.2f} | {gib / wall:.2f} | {wall / w_wall:.2f}x |"
        )
    body = "\n".join(lines) + "\n"
    print(body)
    if a.write:
        write_section(a.write, SECTION, body, "<!-- notes -->")


if __name__ == "__main__":
    main()
