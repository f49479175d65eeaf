"""Concurrent training runs of ``prefopt_compare`` on CPU: thread split vs oversubscription.

Not a test. One invocation, one machine, one after the other, the same 4 DPO runs of the
bundled frontier task (``tiny/frontier``, ``compare.losses=[dpo]``, 4 strengths, 96 steps):

  sequential        compare.max_parallel=1 (torch's default threads: one per core)
  2 at a time       compare.max_parallel=2, the scheduler's default: OMP_NUM_THREADS =
                    cores / 2 for each run
  2, oversubscribed compare.max_parallel=2 with OMP_NUM_THREADS=<cores> set by the user (the
                    scheduler leaves a user's setting alone): each run gets all cores, what
                    every run got before the split

The task (SFT model + pairs) is prepared once and copied into each output directory (its
manifest makes the recipe reuse it), so only training and evaluation are timed. Reported:
wall time of the whole ``tune run prefopt_compare`` process, its CPU time (children
included, from ``resource.getrusage``), and each training run's time as logged by the
scheduler ("<run> done in N s").

Usage (about 4 minutes on 2 quiet cores):
  python benchmarks/bench_compare_parallel.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TUNE = str(Path(sys.executable).parent / "tune")
BASE = [
    "compare.losses=[dpo]",
    "compare.sweep.dpo.beta=[0.03,0.1,0.3,1.0]",
]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def run(out: Path, extra, env_extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(env_extra)
    cmd = [TUNE, "run", "prefopt_compare", "--config", "tiny/frontier", f"output_dir={out}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + BASE + extra, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-4000:])
    runs = [int(x) for x in re.findall(r"\] \S+ done in (\d+)s", proc.stdout + proc.stderr)]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_compare_parallel_"))
    work.mkdir(parents=True, exist_ok=True)
    cores = _cores()
    # prepare the task once (dry run: task + commands.sh, no training)
    prep = work / "prep"
    shutil.rmtree(prep, ignore_errors=True)
    subprocess.run(
        [TUNE, "run", "prefopt_compare", "--config", "tiny/frontier", f"output_dir={prep}"]
        + BASE
        + ["compare.dry_run=true"],
        check=True,
        capture_output=True,
    )
    settings = [
        ("sequential", ["compare.max_parallel=1"], {}),
        ("2 at a time (split)", ["compare.max_parallel=2"], {}),
        ("2, oversubscribed", ["compare.max_parallel=2"], {"OMP_NUM_THREADS": str(cores)}),
    ]
    rows = []
    for name, extra, env in settings:
        out = work / re.sub(r"\W+", "_", name)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        shutil.copytree(prep / "task", out / "task")
        r = run(out, extra, env)
        rows.append((name, r))
        print(f"{name}: wall {r['wall']:.0f}s cpu {r['cpu']:.0f}s runs {r['runs']}", flush=True)
    base = rows[1][1]
    print(f"\n{cores} cores; 4 DPO runs of tiny/frontier (96 steps each) + evaluation\n")
    print("| setting | wall s | CPU s | per-run s (as logged) | wall vs split |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['wall']:.0f} | {r['cpu']:.0f} | {', '.join(map(str, r['runs']))} | "
            f"{r['wall'] / base['wall']:.2f}x |"
        )


if __name__ == "__main__":
    main()
