"""The GPU readiness check (scripts/gpu_check.sh) runs end to end in its CPU dry run.

On a lent GPU machine the same script runs the CUDA path (see benchmarks/gpu_check.py); here
every part must finish on CPU with tiny sizes, CUDA-only rows reported as skipped, and the
report must hold what each part showed. This is what catches a broken script without a GPU.
"""

from __future__ import annotations

import json
import sys

import pytest

from tune_harness import REPO, run_process

pytestmark = pytest.mark.slow

PARTS = (
    "env",
    "recipe_fp32",
    "recipe_bf16",
    "quant_ref",
    "packed",
    "realistic",
    "compile",
    "nccl_2proc",
)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = run_process(["bash", REPO / "scripts" / "gpu_check.sh", "--dry-run", "--out", out], REPO,
                       env={"PYTHON": sys.executable}, timeout=1800)  # fmt: skip
    return proc, out


def test_dry_run_finishes_every_part(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    records = json.loads((out / "gpu_check.json").read_text())
    assert list(records) == list(PARTS)
    assert all(r["status"] == "ok" for r in records.values()), {
        k: r.get("error") for k, r in records.items()
    }
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check (dry run: CPU, tiny sizes)")
    for name in PARTS:
        assert f"| {name} | ok |" in md, md
    for name in PARTS:
        assert (out / f"{name}.log").is_file()


def test_dry_run_numbers(dry_run):
    _, out = dry_run
    r = {k: v["result"] for k, v in json.loads((out / "gpu_check.json").read_text()).items()}
    assert r["env"]["gpu"] is None
    for dtype in ("fp32", "bf16"):
        rec = r[f"recipe_{dtype}"]
        assert rec["fp32_where_required"], rec["dtypes"]
        assert (
            rec["dtypes"]["weights"] == {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[dtype]
        )
        assert rec["steps"] == len(rec["metrics"]) == 3
        assert rec["metrics"][0]["loss"] == pytest.approx(
            0.6931472, abs=1e-6
        )  # policy == reference
    assert r["recipe_bf16"]["vs_fp32_step1"]["ok"]
    assert r["nccl_2proc"]["ok"] and len(r["nccl_2proc"]["losses_2p"]) == 3
    assert "skipped" in r["quant_ref"]["fp8_dynamic"]  # capability >= 8.9 only
    for mode in ("int8", "fp8"):
        q = r["quant_ref"][mode]
        assert 0 < q["seq_logp_abs_err_mean"] <= q["seq_logp_abs_err_max"] < 1.0
        assert q["weight_mib"] < q["weight_mib_bf16"]
    assert r["compile"]["max_rel_loss_diff_vs_eager"] < 1e-5
    # the packed, prompt-shared layout against the padded run, step by step (fp32)
    assert r["packed"]["ok"] and max(r["packed"]["fp32_vs_padded_max_rel"].values()) < 1e-5
    assert len(r["packed"]["bf16_compiled"]["losses"]) == 3
    (workload,) = r["realistic"]["workloads"]
    runs = r["realistic"]["workloads"][workload]["runs"]
    assert set(runs) == {"padded", "shared", "torchtune"}
    assert all(v["tokens_per_s"] > 0 for v in runs.values()), runs


def test_rerun_into_the_same_directory(dry_run):
    """The check can be run again (e.g. after a timeout) into the same --out directory: its
    scratch runs replace their previous output instead of refusing to start."""
    _, out = dry_run
    proc = run_process(
        ["bash", REPO / "scripts" / "gpu_check.sh", "--dry-run", "--out", out, "--parts", "recipe_fp32"],
        REPO, env={"PYTHON": sys.executable}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert json.loads((out / "gpu_check.json").read_text())["recipe_fp32"]["status"] == "ok"


def test_wheels_list():
    proc = run_process(["bash", REPO / "scripts" / "gpu_wheels.sh", "--list"], REPO)
    assert proc.returncode == 0, proc.stderr
    names = proc.stdout.split()
    assert "torchtune==0.6.1" in names and "torchao==0.15.0" in names
    assert "trl==1.16.0" in names  # the realistic part's TRL column
