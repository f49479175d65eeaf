"""End to end: ``packed: true`` + ``share_prompt: true`` against today's padded layout, step by
step, through the real CLI.

Same examples per step (the layouts only change how a micro-batch's sequences are laid out),
so every logged metric of every step -- loss, rewards, accuracies, margins, log-probs, KTO's
KL reference point, grad norm -- and the final weights must agree within 1e-5 relative over a
20-step run, for DPO, IPO (mean log-probs), SimPO (reference-free), KTO (its KL rows share the
prompt of their row), hinge; full fine-tuning and LoRA with activation checkpointing; compile
(aot_eager); 2 processes (compared with the padded layout on 2 processes); and with
``reference.precompute`` (the cache does not depend on the layout: a packed run loads the cache
a padded run wrote). Plus ``packed: true`` alone (no prompt sharing). (``share_prompt`` without
``packed`` is a one-line config error: ``test_bad_input.py``.)

Runs: tiny model, 64-token rows, 4 pairs (KTO: 4 rows) per step, 20 steps, AdamW lr 1e-3 eps
1e-6 (see COMMON for why); each is a ``tune run`` subprocess (``tune_harness.RunPool``, 2 at a time).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Dict, List

import pytest

from tune_harness import (
    CPU_FP32,
    NO_EVAL,
    RunPool,
    RunSpec,
    assert_steps_match,
    load_weights,
    short_run,
    synthetic_rows,
    uses_runs,
    wanted_runs,
    write_jsonl,
)

pytestmark = pytest.mark.slow

STEPS = 20
BATCH = 4
SEQ_LEN = 64
# 1e-5 relative, as the layouts differ only by fp32 rounding (attention over the same keys in
# other kernels/shapes); the absolute floor covers metrics that start at exactly 0 (rewards at
# step 1) and are ~1e-7 after one Adam step.
REL, ABS = 1e-5, 1e-6

COMMON = (
    *short_run(STEPS, SEQ_LEN),
    # Adam divides by sqrt(v) + eps: a parameter whose gradient is rounding noise (the key
    # projection's bias: softmax ignores a shift shared by all keys, so its exact gradient is
    # 0) would get lr-sized steps of random sign at torch's eps=1e-8 and turn fp32 rounding
    # into diverging trajectories that say nothing about the layout
    "optimizer.eps=1e-6",
    # and a step size at which 20 steps do not amplify fp32 rounding (~1e-7 at step 1) past
    # 1e-5: at the tiny configs' 3e-3 the trajectories separate to ~2e-5 by step 15
    "optimizer.lr=1e-3",
    *NO_EVAL,
    "dataset.source=json",
    "~dataset.split",
    *CPU_FP32,
)
SHARED = ("packed=true", "share_prompt=true")
_AOT = (("TORCH_COMPILE_BACKEND", "aot_eager"), ("TORCH_LOGS", "recompiles"))
_PRE = ("reference.precompute=true",)


def _pair(key: str, config: str, extra=(), nproc: int = 1, env=()) -> List[RunSpec]:
    return [
        RunSpec(f"{key}-padded", config, tuple(extra), nproc=nproc, env=env),
        RunSpec(f"{key}-shared", config, (*extra, *SHARED), nproc=nproc, env=env),
    ]


SPECS: Dict[str, RunSpec] = {
    s.key: s
    for s in (
        *_pair("dpo", "tiny/dpo"),
        *_pair("ipo", "tiny/ipo"),
        *_pair("simpo", "tiny/simpo"),
        *_pair("kto", "tiny/kto"),
        *_pair("hinge", "tiny/dpo", ("loss=hinge",)),
        *_pair("lora-ac", "tiny/dpo_lora", ("enable_activation_checkpointing=true",)),
        *_pair("kto-2p", "tiny/kto", nproc=2),
        RunSpec("dpo-packed", "tiny/dpo", ("packed=true",)),
        RunSpec("dpo-shared-compile", "tiny/dpo", (*SHARED, "compile=true"), env=_AOT),
        RunSpec("dpo-padded-pre", "tiny/dpo", _PRE),
        RunSpec(
            "dpo-shared-pre",
            "tiny/dpo",
            (*_PRE, *SHARED),
            seed_from="dpo-padded-pre",
            seed_paths=("reference_cache",),
        ),
    )
}

#: (padded run, packed run) pairs compared step by step and by final weights
PAIRS = {
    "dpo": ("dpo-padded", "dpo-shared"),
    "ipo": ("ipo-padded", "ipo-shared"),
    "simpo": ("simpo-padded", "simpo-shared"),
    "kto": ("kto-padded", "kto-shared"),
    "hinge": ("hinge-padded", "hinge-shared"),
    "lora+activation checkpointing": ("lora-ac-padded", "lora-ac-shared"),
    "kto 2 processes": ("kto-2p-padded", "kto-2p-shared"),
    "packed without sharing": ("dpo-padded", "dpo-packed"),
    "compile (aot_eager)": ("dpo-padded", "dpo-shared-compile"),
    "precompute (cache of a padded run)": ("dpo-padded-pre", "dpo-shared-pre"),
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    from torchtune_prefopt.models.tiny import make_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("packing")
    base_dir = make_tiny_hf_checkpoint(root / "base", seed=0)
    paired = write_jsonl(root / "pairs.jsonl", synthetic_rows(STEPS * BATCH))
    kto = write_jsonl(root / "kto.jsonl", synthetic_rows(STEPS * BATCH // 2))

    def overrides(spec: RunSpec, out_dir: Path) -> List[str]:
        is_kto = spec.config.startswith("tiny/kto")
        data = (
            "dataset._component_=torchtune_prefopt.data."
            + ("unpaired_from_paired" if is_kto else "preference_dataset"),
            f"dataset.data_files={kto if is_kto else paired}",
        )
        return [
            *COMMON,
            *data,
            f"batch_size={BATCH // spec.nproc}",
            *spec.overrides,
            f"output_dir={out_dir}",
            f"checkpointer.checkpoint_dir={base_dir}",
        ]

    pool = RunPool(root, SPECS, overrides)
    for key in sorted(wanted_runs(request), key=lambda k: not ("2p" in k or "compile" in k)):
        pool.submit(key)
    start = time.perf_counter()
    yield pool
    pool.close()
    print(
        f"\n[packing runs] {len(pool.timings())} runs, {time.perf_counter() - start:.0f}s wall: "
        f"{pool.summary()}"
    )


def _weights(run) -> dict:
    lora = "lora" in run.spec.key
    return load_weights(run.final, adapter=lora)


@pytest.mark.parametrize("what", list(PAIRS))
@uses_runs(lambda what: PAIRS[what])
def test_packed_equals_padded_step_by_step(runs, what):
    padded_key, packed_key = PAIRS[what]
    padded, packed = runs.get(padded_key).check(), runs.get(packed_key).check()
    s_pad, s_pack = padded.steps(), packed.steps()
    assert sorted(s_pad) == sorted(s_pack) == list(range(1, STEPS + 1))
    # rewards and KTO's KL are differences of log-prob sums (|logp| ~ 70 here, fp32 ulp
    # 7.6e-6): their error is relative to the log-probs they come from, not to themselves
    diffs = {k for k in s_pad[1] if k.startswith("rewards/") or k == "kl"} - {"rewards/accuracies"}
    worst = assert_steps_match(s_pad, s_pack, f"{what}: packed vs padded", REL, ABS, skip=diffs)
    scale = max(abs(v) for m in s_pad.values() for k, v in m.items() if k.startswith("logps/"))
    only = {st: {k: v for k, v in m.items() if k in diffs} for st, m in s_pad.items()}
    worst = max(
        worst, assert_steps_match(only, s_pack, f"{what}: packed vs padded", REL, REL * scale)
    )
    assert "grad_norm" in s_pack[STEPS] and "loss" in s_pack[STEPS]
    # the run trained: the loss moved
    assert abs(s_pack[STEPS]["loss"] - s_pack[1]["loss"]) > 1e-3
    w_pad, w_pack = _weights(padded), _weights(packed)
    assert sorted(w_pad) == sorted(w_pack)
    worst_w = 0.0
    for name in w_pad:
        # relative in norm: Adam moves every element by ~lr whatever its gradient, so elements
        # whose gradient is at rounding level can differ by more, elementwise
        a, b = w_pad[name].double(), w_pack[name].double()
        rel = float((a - b).norm() / a.norm().clamp_min(1e-30))
        worst_w = max(worst_w, rel)
        assert rel <= REL, f"{what}: final {name} differs by {rel:.3g} (relative, in norm)"
    print(f"{what}: max |metric diff| {worst:.2g}, max relative weight diff {worst_w:.2g}")


@uses_runs("dpo-shared-compile")
def test_compiled_packed_run_recompiles_a_bounded_number_of_times(runs):
    run = runs.get("dpo-shared-compile").check()
    out = run.output
    assert "Compiling model layers with torch.compile" in out
    recompiles = [ln for ln in out.splitlines() if "Recompiling function" in ln]
    # per compiled function: grad mode (policy vs no-grad reference/eval), requires_grad of
    # the frozen reference's parameters, and a bounded number of row lengths (multiples of 128)
    functions = {
        re.sub(r".*Recompiling function (\S+) in (\S+).*", r"\1 \2", ln) for ln in recompiles
    }
    assert recompiles and len(recompiles) <= 4 * len(functions), recompiles
    print(f"compile: {len(recompiles)} recompiles over {len(functions)} compiled functions")


@uses_runs("dpo-shared-pre")
def test_packed_run_loads_the_padded_runs_reference_cache(runs):
    run = runs.get("dpo-shared-pre").check()
    assert "loaded reference log-probs from" in run.output, run.tail()
    assert "reference log-probs precomputed" not in run.output
