"""The new losses and terms through the recipe: every new name runs as ``loss=<name>``; a
weighted sum (DPO + APO-zero + SFT) logs each term as ``loss/<name>``, sums them, and gives the
same steps on 1 and 2 processes (the SFT term's global token mean does not depend on the
number of processes), in the packed + prompt-shared layout and with a precomputed reference;
ORPO (reference-free, with its NLL term) trains with LoRA."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List

import pytest

from tune_harness import (
    RunPool,
    RunSpec,
    assert_steps_match,
    synthetic_rows,
    tiny_config,
    uses_runs,
    wanted_runs,
    write_jsonl,
)

pytestmark = pytest.mark.slow

ROWS, BATCH, STEPS = 12, 4, 3
WEIGHTED = {
    "_component_": "torchtune_prefopt.losses.WeightedSum",
    "terms": [
        {"loss": "dpo", "weight": 1.0, "beta": 0.1},
        {"loss": "apo_zero", "weight": 0.5, "beta": 0.1},
        {"loss": "sft", "weight": 0.2},
    ],
}
COMMON = ("lr_scheduler=null", "optimizer.lr=3e-3", "shuffle=false", "save_every_n_steps=null")
SPECS = {
    "ws-1p": RunSpec("ws-1p", "ws.yaml"),
    "ws-2p": RunSpec("ws-2p", "ws.yaml", nproc=2),
    "ws-shared": RunSpec("ws-shared", "ws.yaml", ("packed=true", "share_prompt=true")),
    "ws-precompute": RunSpec("ws-precompute", "ws.yaml", ("reference.precompute=true",)),
    "orpo-lora": RunSpec("orpo-lora", "orpo_lora.yaml"),
}
NEW_NAMES = ("dpo_norm", "dpop", "apo_zero", "orpo", "sft")
for _name in NEW_NAMES:
    SPECS[f"swap-{_name}"] = RunSpec(
        f"swap-{_name}", "dpo.yaml", (f"loss={_name}", "max_steps_per_epoch=1")
    )


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    from torchtune_prefopt.models.tiny import make_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("loss_terms")
    base = make_tiny_hf_checkpoint(root / "base", seed=0)
    data = write_jsonl(root / "pairs.jsonl", synthetic_rows(ROWS))
    configs = root / "configs"
    configs.mkdir()
    for name, source, loss in (
        ("ws", "dpo", WEIGHTED),
        ("dpo", "dpo", None),
        ("orpo_lora", "dpo_lora", "orpo"),
    ):
        work = configs / name
        work.mkdir()
        edits = {"loss": loss} if loss is not None else {}
        path = tiny_config(work, source, rows=ROWS, **edits)
        path.rename(configs / f"{name}.yaml")

    def overrides(spec: RunSpec, out_dir: Path) -> List[str]:
        return [
            *COMMON,
            f"dataset.data_files={data}",
            f"batch_size={BATCH // spec.nproc}",
            f"checkpointer.checkpoint_dir={base}",
            *spec.overrides,
            f"output_dir={out_dir}",
        ]

    specs = {
        k: RunSpec(**{**v.__dict__, "config": str(configs / v.config)}) for k, v in SPECS.items()
    }
    pool = RunPool(root, specs, overrides)
    for key in sorted(wanted_runs(request), key=lambda k: "2p" not in k):
        pool.submit(key)
    yield pool
    pool.close()


@uses_runs("ws-1p")
def test_weighted_sum_logs_and_sums_its_terms(runs):
    steps = runs.get("ws-1p").check().steps()
    assert sorted(steps) == list(range(1, STEPS + 1))
    first = steps[1]
    # policy == reference at step 1: DPO is ln 2, APO-zero is 1 - σ(0) + σ(0) = 1
    assert first["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["loss/apo_zero"] == pytest.approx(1.0, abs=1e-6)
    assert first["loss/sft"] > 0
    for m in steps.values():
        total = m["loss/dpo"] + 0.5 * m["loss/apo_zero"] + 0.2 * m["loss/sft"]
        assert m["loss"] == pytest.approx(total, rel=1e-6)
    assert steps[STEPS]["loss"] < first["loss"]


@uses_runs("ws-1p", "ws-2p")
def test_weighted_sum_with_sft_is_the_same_on_two_processes(runs):
    one, two = runs.get("ws-1p").check(), runs.get("ws-2p").check()
    assert_steps_match(
        one.steps(), two.steps(), "weighted sum: 2 processes vs 1", rel=1e-5, abs_=1e-6
    )


@uses_runs("ws-1p", "ws-shared", "ws-precompute")
def test_weighted_sum_in_the_packed_layout_and_with_a_precomputed_reference(runs):
    padded = runs.get("ws-1p").check().steps()
    rewards = {k for k in padded[1] if k.startswith("rewards/") and k != "rewards/accuracies"}
    for key in ("ws-shared", "ws-precompute"):
        other = runs.get(key).check().steps()
        assert_steps_match(
            padded, other, f"weighted sum: {key} vs padded", rel=1e-5, abs_=1e-6, skip=rewards
        )
        for step in padded:
            for k in rewards:
                assert other[step][k] == pytest.approx(padded[step][k], abs=1e-5)


@uses_runs("orpo-lora")
def test_orpo_with_lora_trains_without_a_reference(runs):
    run = runs.get("orpo-lora").check()
    assert "reference model: none (ORPOLoss is reference-free)" in run.output
    steps = run.steps()
    assert steps[STEPS]["loss"] < steps[1]["loss"]


@pytest.mark.parametrize("name", NEW_NAMES)
@uses_runs(lambda name: [f"swap-{name}"])
def test_every_new_name_swaps_in_on_the_command_line(runs, name):
    run = runs.get(f"swap-{name}").check()
    classes = {
        "dpo_norm": "DPONormLoss",
        "dpop": "DPOPLoss",
        "apo_zero": "APOZeroLoss",
        "orpo": "ORPOLoss",
        "sft": "SFTLoss",
    }
    assert f"== prefopt_distributed: {classes[name]} |" in run.stdout
    first = run.steps()[1]["loss"]
    if name in ("dpo_norm", "dpop"):
        assert first == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    elif name == "apo_zero":
        assert first == pytest.approx(1.0, abs=1e-6)
    else:
        assert first > 0
