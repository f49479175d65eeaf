"""End to end: the reference options of `tune run prefopt_distributed` through the real CLI.

``reference.precompute`` (cached reference log-probs, the reference model freed), the
quantized reference (``reference.quantization``) and ``compile``, each compared with the
plain live-reference eager run on the same tiny model, data and seed:

1. DPO with ``precompute=true`` logs the same per-step training metrics and held-out eval
   metrics as the live-reference run; a second run on the same inputs loads the cache; a
   changed input (the quantization mode) makes the cache stale and it is recomputed;
2. KTO with ``precompute=true`` on 1 and on 2 processes (same global batch) and the live run
   agree step by step (loss and the all-reduced KL reference point);
3. resuming a precompute run from its step-2 checkpoint (with the cache) continues exactly;
4. int8 / fp8 weight-only references run, log their quantization summary, and move step 1's
   loss away from ln 2 by about the quantization error only; ``fp8_dynamic`` on CPU is a
   one-line exit-2 error before anything is written;
5. ``compile=true`` (``TORCH_COMPILE_BACKEND=aot_eager``) matches eager for DPO (1 process)
   and KTO (2 processes: z0's all-reduce inside the compiled loss).

Every run is a subprocess of the installed ``tune`` (cwd: its own tmp dir, OMP_NUM_THREADS=1),
on tiny data written into the module's tmp dir (16 training pairs = exactly 4 steps of 4, 8
held-out pairs): ~10-12 CPU-seconds per process, most of it importing torch; the compiled runs
~25 CPU-seconds per process (aot_eager tracing); ~3.5 CPU-minutes for the 11 runs (13
processes) of the whole file on a 2-core CPU, ~4-5 min wall when shared. The runs the selected
tests need start when the module's first test starts, 2 at a time, dependencies first; tests
only read their runs' outputs (``output_dir/logs/log_*.txt``, stdout/stderr). A run that seeds
its ``output_dir`` from another run copies files (never writes into the other run's dir).

"the reference is freed" is read from the recipe's log line ``reference model freed: ...``
(logged by ``_setup_reference_cache`` once the cache is filled).
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Dict, List

import pytest

from tune_harness import (
    CPU_FP32,
    VOLATILE,
    RunPool,
    RunSpec,
    assert_steps_match,
    short_run,
    uses_runs,
    wanted_runs,
)

pytestmark = pytest.mark.slow


STEPS = 4
BATCH = 4  # global rows per optimizer step
SEQ_LEN = 64
N_TRAIN_PAIRS = STEPS * BATCH  # DPO: exactly one epoch of STEPS steps
N_KTO_PAIRS = STEPS * BATCH // 2  # KTO: 2 unpaired rows per pair -> STEPS steps
N_EVAL_PAIRS = 2 * BATCH  # 2 eval batches
LN2 = math.log(2.0)


# Tolerance of precomputed vs live reference. The cached value of a row is the same frozen
# reference forward of the same token ids; only the batch it ran in differs (position order,
# batch of 4, vs the shuffled training micro-batch), so only the padded length and so the GEMM
# / attention shapes can differ: at most fp32 rounding of a summed log-prob (|logp| ~ 70, fp32
# ulp 7.6e-6), i.e. ~1e-6 on a reward (beta 0.1) and less on the loss. Measured here: bitwise
# equal (every logged value identical); the bound allows a BLAS that blocks by batch size.
CACHE_ABS = 2e-5
CACHE_REL = 1e-5
# 2 processes vs 1 (precompute on both): FSDP2 reduce-scatters the gradients (another
# summation order) and Adam amplifies float noise, as in test_recipe_e2e's 2-process check.
TWO_PROC_REL, TWO_PROC_ABS = 1e-4, 1e-5
# compile vs eager: 1e-5 relative (aot_eager runs the same ATen ops, traced and decomposed;
# measured here: bitwise equal for DPO 1 process and KTO 2 processes).
COMPILE_REL, COMPILE_ABS = 1e-5, 1e-6

_PAIRED_DATA = (
    "dataset._component_=torchtune_prefopt.data.preference_dataset",
    "dataset.source=json",
    "~dataset.split",
)
_KTO_DATA = (
    "dataset._component_=torchtune_prefopt.data.unpaired_from_paired",
    "dataset.source=json",
    "~dataset.split",
)
_EVAL = (
    "eval_dataset._component_=torchtune_prefopt.data.preference_dataset",
    "eval_dataset.source=json",
    "~eval_dataset.split",
    "eval_every_n_steps=2",
)

COMMON = (
    *short_run(STEPS, SEQ_LEN),
    "keep_last_n_checkpoints=null",
    *CPU_FP32,
    "compile=false",
)


# --------------------------------------------------------------------------------------
# runs (tune_harness.RunPool; ``tags=("eval",)``: with the held-out set)


_CACHE = "reference_cache"
_PRE = ("reference.precompute=true",)
# recompiles/graph_breaks: dynamo's own log lines show that the layers really were compiled
_AOT = (("TORCH_COMPILE_BACKEND", "aot_eager"), ("TORCH_LOGS", "recompiles,graph_breaks"))

SPECS: Dict[str, RunSpec] = {
    s.key: s
    for s in (
        # 1. DPO: live reference vs precomputed; the precompute run also saves at step 2 (3.)
        RunSpec("dpo-live", "tiny/dpo", tags=("eval",)),
        RunSpec("dpo-pre", "tiny/dpo", (*_PRE, "save_every_n_steps=2"), tags=("eval",)),
        # second run, same inputs, the first run's cache and step-2 checkpoint: loads the cache
        # and resumes (3.)
        RunSpec(
            "dpo-pre-resume",
            "tiny/dpo",
            (*_PRE, "save_every_n_steps=2", "resume_from_checkpoint=true"),
            tags=("eval",),
            seed_from="dpo-pre",
            seed_paths=(_CACHE, "checkpoints/step_000002"),
        ),
        # one input changed (the reference's quantization): the copied cache is stale (1., 4.)
        RunSpec(
            "dpo-pre-int8",
            "tiny/dpo",
            (*_PRE, "reference.quantization=int8"),
            seed_from="dpo-pre",
            seed_paths=(_CACHE,),
        ),
        RunSpec("dpo-fp8", "tiny/dpo", ("reference.quantization=fp8",)),
        RunSpec("dpo-fp8-dynamic", "tiny/dpo", ("reference.quantization=fp8_dynamic",)),
        # 2. KTO
        RunSpec("kto-live", "tiny/kto"),
        RunSpec("kto-pre", "tiny/kto", _PRE),
        RunSpec("kto-pre-2p", "tiny/kto", _PRE, nproc=2),
        # 5. compile
        RunSpec("dpo-compile", "tiny/dpo", ("compile=true",), env=_AOT),
        # KTO on 2 processes: z0's all-reduce inside the compiled loss must really sum over ranks
        # (on 1 process any reduction would pass); compared with the eager 2-process run
        RunSpec("kto-compile-2p", "tiny/kto", (*_PRE, "compile=true"), nproc=2, env=_AOT),
    )
}


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _write_data(root: Path) -> Dict[str, Path]:
    from torchtune_prefopt.data import synthetic_data_file

    out = {}
    for name, split, n in (
        ("train", "train", N_TRAIN_PAIRS),
        ("kto", "train", N_KTO_PAIRS),
        ("eval", "heldout", N_EVAL_PAIRS),
    ):
        lines = synthetic_data_file(split).read_text().splitlines()[:n]
        assert len(lines) == n
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    from torchtune_prefopt.models.tiny import make_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("refrecipe")
    base_dir = make_tiny_hf_checkpoint(root / "base", seed=0)
    data = _write_data(root)

    def overrides(spec: RunSpec, out_dir: Path) -> List[str]:
        paired = spec.config == "tiny/dpo"
        ds = (
            *(_PAIRED_DATA if paired else _KTO_DATA),
            f"dataset.data_files={data['train' if paired else 'kto']}",
        )
        ev = (
            (*_EVAL, f"eval_dataset.data_files={data['eval']}")
            if "eval" in spec.tags
            else ("eval_dataset=null",)
        )
        return [
            *COMMON,
            *ds,
            *ev,
            f"batch_size={BATCH // spec.nproc}",
            *spec.overrides,
            f"output_dir={out_dir}",
            f"checkpointer.checkpoint_dir={base_dir}",
        ]

    pool = RunPool(root, SPECS, overrides)
    # the 2-process and compile runs first: they take longest
    for key in sorted(
        wanted_runs(request), key=lambda k: not (k.endswith("-2p") or "compile" in k)
    ):
        pool.submit(key)
    start, cpu0 = time.perf_counter(), _children_cpu()
    yield pool
    pool.close()
    print(
        f"\n[reference recipe runs] {len(pool.timings())} runs, {time.perf_counter() - start:.0f}s wall, "
        f"{_children_cpu() - cpu0:.0f} CPU-s in the runs: {pool.summary()}"
    )


# --------------------------------------------------------------------------------------
# helpers


_QUANT = re.compile(
    r"reference quantized to (\w+): (\d+) linear layers.*?; weights ([\d.]+) MiB -> ([\d.]+) MiB \(([\d.]+)x\)"
)


# --------------------------------------------------------------------------------------
# 1. DPO: precomputed reference == live reference; cache reuse and staleness


@uses_runs("dpo-live", "dpo-pre")
def test_dpo_precompute_equals_live_reference(runs):
    live = runs.get("dpo-live").check()
    pre = runs.get("dpo-pre").check()
    s_live, s_pre = live.steps(), pre.steps()
    assert sorted(s_live) == sorted(s_pre) == list(range(1, STEPS + 1))
    assert s_pre[1]["loss"] == pytest.approx(LN2, abs=1e-6)  # policy == reference at step 1
    assert s_pre[STEPS]["loss"] < s_pre[1]["loss"]  # it trains
    worst = assert_steps_match(s_live, s_pre, "dpo precompute vs live", CACHE_REL, CACHE_ABS)
    print(f"dpo precompute vs live: max |diff| over all step metrics {worst:.3g}")
    # held-out eval: steps 0 (before training), 2 and 4; the reference rows come from the
    # eval cache (rewards, margins, eval/reference/accuracies)
    e_live, e_pre = live.evals(), pre.evals()
    assert sorted(e_live) == sorted(e_pre) == [0, 2, 4], (sorted(e_live), sorted(e_pre))
    assert e_pre[0]["eval/rows"] == N_EVAL_PAIRS
    assert e_pre[0]["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert e_pre[4]["eval/rewards/margins"] != pytest.approx(0.0, abs=1e-3)  # the eval reward moved
    worst = assert_steps_match(e_live, e_pre, "dpo eval precompute vs live", CACHE_REL, CACHE_ABS)
    print(f"dpo eval precompute vs live: max |diff| {worst:.3g}")

    out = pre.output
    # the cache was computed (train + eval rows), written, and the reference model freed
    assert "no reference log-prob cache at" in out, pre.tail()
    assert f"reference log-probs precomputed: {N_TRAIN_PAIRS} rows" in out, pre.tail()
    assert f"reference log-probs precomputed: {N_EVAL_PAIRS} rows" in out, pre.tail()
    assert "reference model freed" in out, pre.tail()
    assert "loaded reference log-probs" not in out
    assert (pre.out_dir / "reference_cache" / "reference_logps.safetensors").is_file()
    # one weight-digest memo per machine ($PREFOPT_CACHE_DIR), none beside the cache
    assert not (pre.out_dir / "reference_cache" / "weights_digests.json").exists()
    assert (pre.out_dir / "reference_cache" / "eval" / "reference_logps.safetensors").is_file()
    # the live run never touches a cache
    assert "reference log-probs" not in live.output and "reference model freed" not in live.output
    assert not (live.out_dir / "reference_cache").exists()


@uses_runs("dpo-pre", "dpo-pre-resume")
def test_dpo_second_run_loads_the_cache(runs):
    """The second run (same inputs; here resumed from step 2, see the resume test) loads both
    caches instead of running the reference."""
    r = runs.get("dpo-pre-resume").check()
    out = r.output
    assert "loaded reference log-probs from" in out, r.tail()
    loaded = re.findall(r"loaded reference log-probs from (\S+)", out)
    assert sorted(Path(p).parent.name for p in loaded) == ["eval", "reference_cache"], loaded
    assert "reference log-probs precomputed" not in out, r.tail()
    assert "hashed" not in out  # the weights digest is memoised in the copied cache dir
    assert "reference model freed" in out


@uses_runs("dpo-pre", "dpo-pre-int8")
def test_dpo_changed_input_recomputes_stale_cache(runs):
    r = runs.get("dpo-pre-int8").check()
    out = r.output
    m = re.search(r"^.*reference_logps\.safetensors is stale \((.*)\).*$", out, re.M)
    assert m, f"no stale-cache message\n{r.tail()}"
    assert m.group(1) == "changed since it was written: quantization", m.group(
        0
    )  # names what changed
    assert "loaded reference log-probs" not in out
    assert f"reference log-probs precomputed: {N_TRAIN_PAIRS} rows" in out
    assert "saved reference log-probs to" in out
    print(f"stale message: {m.group(0).strip()}")


# --------------------------------------------------------------------------------------
# 2. KTO: precompute on 1 and 2 processes == live


@uses_runs("kto-live", "kto-pre", "kto-pre-2p")
def test_kto_precompute_one_and_two_processes_equal_live(runs):
    live = runs.get("kto-live").check()
    pre = runs.get("kto-pre").check()
    two = runs.get("kto-pre-2p").check()
    s_live, s_pre, s_two = live.steps(), pre.steps(), two.steps()
    assert sorted(s_live) == sorted(s_pre) == sorted(s_two) == list(range(1, STEPS + 1))
    assert s_pre[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert s_pre[1]["loss"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0), both weights 1
    assert any(s["kl"] > 0 for s in s_pre.values()), s_pre  # z0 moves once the policy does
    worst = assert_steps_match(s_live, s_pre, "kto precompute vs live", CACHE_REL, CACHE_ABS)
    print(f"kto precompute vs live: max |diff| {worst:.3g}")
    worst = assert_steps_match(
        s_pre, s_two, "kto precompute, 2 vs 1 processes", TWO_PROC_REL, TWO_PROC_ABS
    )
    print(f"kto precompute 2 vs 1 processes: max |diff| {worst:.3g}")
    pairs = re.search(
        r"reference log-probs precomputed: (\d+) rows \+ (\d+) KL pairs in .* on (\d+) process",
        two.output,
    )
    assert pairs, two.tail()
    assert int(pairs.group(1)) == 2 * N_KTO_PAIRS and int(pairs.group(3)) == 2
    assert int(pairs.group(2)) == STEPS * BATCH  # one KL pair per row, all distinct here
    assert "reference model freed" in pre.output and "reference model freed" in two.output


# --------------------------------------------------------------------------------------
# 3. resume with precompute == uninterrupted


@uses_runs("dpo-pre", "dpo-pre-resume")
def test_resume_with_precompute_equals_uninterrupted(runs):
    full = runs.get("dpo-pre").check()
    res = runs.get("dpo-pre-resume").check()
    assert "Resuming from" in res.output, res.tail()
    s_full, s_res = full.steps(), res.steps()
    assert sorted(s_res) == [3, 4], sorted(s_res)
    for step in s_res:
        a = {k: v for k, v in s_full[step].items() if k not in VOLATILE}
        b = {k: v for k, v in s_res[step].items() if k not in VOLATILE}
        assert a == b, f"step {step}: resumed {b} != uninterrupted {a}"  # exact, incl. lr
    e_full, e_res = full.evals(), res.evals()
    assert sorted(e_res) == [4], sorted(e_res)  # no step-0 eval on resume
    assert e_res[4] == e_full[4]
    import torch
    from safetensors.torch import load_file

    for f in sorted((full.out_dir / "final").glob("model*.safetensors")):
        a, b = load_file(str(f)), load_file(str(res.out_dir / "final" / f.name))
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in a), f"final weights differ in {f.name}"


# --------------------------------------------------------------------------------------
# 4. quantized reference


@pytest.mark.parametrize("key,mode", [("dpo-pre-int8", "int8"), ("dpo-fp8", "fp8")])
@uses_runs("dpo-pre", "dpo-pre-int8", "dpo-fp8")
def test_quantized_reference_runs(runs, key, mode):
    r = runs.get(key).check()
    m = _QUANT.search(r.output)
    assert m, f"no quantization summary\n{r.tail()}"
    assert m.group(1) == mode
    n_layers, before, after, ratio = (
        int(m.group(2)),
        float(m.group(3)),
        float(m.group(4)),
        float(m.group(5)),
    )
    # ratio = after / before. The tiny model's untied output projection (kept in full
    # precision) is a large share of its linear weights, hence only ~0.67x here.
    assert n_layers > 0 and "kept 1 in full precision (output)" in m.group(0), m.group(0)
    assert after < before and 0 < ratio < 0.9, m.group(0)
    steps = r.steps()
    assert sorted(steps) == list(range(1, STEPS + 1))
    first = steps[1]
    # Step 1: the policy is the full-precision base, the reference its quantized copy. The
    # log-ratio is the quantization error only: not exactly 0, and small. DPO's loss is
    # -logsigmoid(x) = ln2 - x/2 + x^2/8 + O(x^4) with x = beta*h, so loss1 - ln2 is first order
    # in the mean margin; its size is bounded by ~beta/2 * |h| (int8: |h| <= ~0.05, fp8: ~0.35 per
    # pair on this kind of model, tests/test_reference_quantize.py): a loose |.| < 0.05 here.
    assert abs(first["rewards/chosen"]) + abs(first["rewards/rejected"]) > 0, first
    dev = first["loss"] - LN2
    assert abs(dev) < 0.05, f"{mode}: step-1 loss {first['loss']} is {dev:+.3g} from ln 2"
    # consistent with the logged margin to first order (the x^2/8 term: < 2e-3 for |x| < 0.12)
    assert abs(dev + first["rewards/margins"] / 2) < 2e-3, (dev, first)
    assert steps[STEPS]["loss"] < first["loss"]
    print(
        f"{mode}: weights {before} -> {after} MiB ({ratio}x), step-1 loss {first['loss']:.6f} "
        f"(ln2 {dev:+.2e}), margin {first['rewards/margins']:+.2e}, "
        f"rewards chosen {first['rewards/chosen']:+.2e} rejected {first['rewards/rejected']:+.2e}"
    )


@uses_runs("dpo-fp8-dynamic")
def test_fp8_dynamic_on_cpu_is_a_one_line_error(runs):
    r = runs.get("dpo-fp8-dynamic")
    assert r.returncode == 2, f"exit {r.returncode}\n{r.tail()}"
    assert "Traceback" not in r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert "fp8_dynamic" in errors[0] and "8.9" in errors[0], errors[0]
    # validated before the recipe builds anything: output_dir is not even created
    assert not r.out_dir.exists(), sorted(p.name for p in r.out_dir.iterdir())


# --------------------------------------------------------------------------------------
# 5. compile == eager


# Backend aot_eager: dynamo + AOTAutograd trace the same graphs as inductor would, without
# generating and building C++ kernels. Inductor, tried once on this (2-core, shared) CPU for the
# DPO run: 93 s user + 15 s sys CPU, 206 s wall (aot_eager: ~25 CPU-s), per-step losses within
# 3.4e-7 relative of eager (step 3: 0.4471742287 vs 0.4471741766); too slow for this file.
@pytest.mark.parametrize("loss", ["dpo", "kto"])
@uses_runs("dpo-live", "dpo-compile", "kto-pre-2p", "kto-compile-2p")
def test_compile_matches_eager(runs, loss):
    """DPO: 1 process, live reference (the reference's layers are compiled too). KTO: 2
    processes with precompute (the compiled reference fills the cache), so that z0 is a real
    2-rank all-reduce inside the compiled loss."""
    eager = runs.get({"dpo": "dpo-live", "kto": "kto-pre-2p"}[loss]).check()
    comp = runs.get({"dpo": "dpo-compile", "kto": "kto-compile-2p"}[loss]).check()
    out = comp.output
    assert (
        "Compiling model layers with torch.compile" in out
        and "Compiling loss with torch.compile" in out
    )
    # dynamo compiled the decoder layers (and re-specialised them: grad mode, new lengths)
    assert "Recompiling function forward" in out and "torchtune/modules/transformer.py" in out, (
        comp.tail()
    )
    breaks = sorted(
        {ln.split("]", 2)[-1].strip()[:160] for ln in out.splitlines() if "__graph_breaks" in ln}
    )
    name = "DPOLoss" if loss == "dpo" else "KTOLoss"
    assert f"== prefopt_distributed: {name} |" in comp.stdout, comp.stdout  # not "OptimizedModule"
    s_e, s_c = eager.steps(), comp.steps()
    assert sorted(s_c) == list(range(1, STEPS + 1))
    worst = assert_steps_match(s_e, s_c, f"{loss} compile vs eager", COMPILE_REL, COMPILE_ABS)
    if loss == "kto":
        # z0 (logged as kl) comes out of the compiled loss's all-reduce over both ranks
        assert "on 2 process(es)" in out
        assert any(s["kl"] > 0 for s in s_c.values())
    print(
        f"{loss} compile (aot_eager) vs eager: max |diff| {worst:.3g}; graph breaks logged: {breaks[:6]}"
    )
