"""Held-out evaluation counts every row exactly once, on any world size and batch size.

The held-out metrics at step 0 (before any update: policy = reference = the base weights) are
checked against an independent derivation: each held-out pair scored alone through the full
``[1, S, V]`` logits (torchtune's ``rlhf.get_batch_log_probs``), averaged over all rows. A row
dropped or counted twice moves the means. Then 2 processes (torchrun, gloo) must report the
same rows and numbers, including a held-out set smaller than one global batch and one with
fewer rows than processes (a rank without a row runs a padding copy that is not counted).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tune_harness import (
    run_in_process,
    run_recipe,
    step_metrics,
    synthetic_rows,
    tiny_config,
    write_jsonl,
)

ROWS = (11, 3, 1)  # not a multiple of the global batch (4); < one global batch; < 2 processes


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from torchtune_prefopt.models.tiny import make_tiny_hf_checkpoint

    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_base") / "base")


def _config(workdir: Path, base: Path, n_eval: int) -> Path:
    shutil.copytree(base, workdir / "base", dirs_exist_ok=True)
    heldout = write_jsonl(workdir / "heldout.jsonl", synthetic_rows(n_eval, split="heldout"))
    return tiny_config(
        workdir, "dpo", rows=8, batch_size=4, max_steps_per_epoch=1, eval_every_n_steps=None,
        eval_dataset={"_component_": "torchtune_prefopt.data.preference_dataset", "source": "json",
                      "data_files": str(heldout)},
    )  # fmt: skip


def _independent_step0(config: Path) -> dict:
    """Step-0 held-out metrics from scratch: every pair alone, full logits."""
    from torchtune import config as tt_config
    from torchtune import rlhf, training

    from torchtune_prefopt.losses import pair_accuracy

    cfg = OmegaConf.load(config)
    tok = tt_config.instantiate(cfg.tokenizer)
    ds = tt_config.instantiate(cfg.eval_dataset, tokenizer=tok)
    model = tt_config.instantiate(cfg.model)
    model.load_state_dict(
        tt_config.instantiate(cfg.checkpointer).load_checkpoint()[training.MODEL_KEY]
    )
    model.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for i in range(len(ds)):
            for side, out in (("chosen", chosen), ("rejected", rejected)):
                ids = torch.tensor([ds[i][f"{side}_input_ids"]])
                labels = torch.tensor([ds[i][f"{side}_labels"]])
                out.append(rlhf.get_batch_log_probs(model(ids), labels).double())
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {
        "eval/rows": float(len(ds)),
        "eval/logps/chosen": c.mean().item(),
        "eval/logps/rejected": r.mean().item(),
        "eval/reference/accuracies": pair_accuracy(c, r).mean().item(),
        "eval/logps/accuracies": pair_accuracy(c, r).mean().item(),  # the policy is the reference
        "eval/rewards/accuracies": 0.5,  # policy == reference: every reward is 0, a tie
        "eval/rewards/margins": 0.0,
        "eval/rewards/chosen": 0.0,
        "eval/rewards/rejected": 0.0,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base):
    """{n_eval: (config, 1-process step-0 eval, 2-process step-0 eval)}"""
    root = tmp_path_factory.mktemp("heldout")
    out = {}
    for n in ROWS:
        one = root / f"{n}-1p"
        one.mkdir()
        config = _config(one, base, n)
        run_in_process(OmegaConf.load(config))
        two = root / f"{n}-2p"
        two.mkdir()
        config2 = _config(two, base, n)
        proc = run_recipe(config2, "batch_size=2", cwd=two, nproc=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[n] = (config, step_metrics(one / "out")[1][0], step_metrics(two / "out")[1][0])
    return out


@pytest.mark.parametrize("n", ROWS)
def test_every_row_once_one_process(runs, n):
    config, one, _ = runs[n]
    want = _independent_step0(config)
    assert one["eval/rows"] == n
    for key, value in want.items():
        assert one[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("n", ROWS)
def test_two_processes_report_the_same(runs, n):
    _, one, two = runs[n]
    assert two["eval/rows"] == one["eval/rows"] == n
    assert set(two) == set(one)
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
