"""Numeric guards, through the real ``tune`` CLI (CPU, tiny model), and bf16 precision.

Faults are injected without mocks: a loss class in a module written to tmp_path (put on the
run's PYTHONPATH and selected with ``loss._component_: guardloss.FaultyDPOLoss``) is DPO,
except that on chosen calls it returns NaN for one row of the batch, or adds
``sqrt(x - x.detach())`` (value 0, gradient +inf) so the loss is finite but the gradient is
not. DPO with beta=1e6 and plain SGD with lr=1e36 (no schedule, no clipping) turns the
weights non-finite in one optimizer step while the loss and the gradient norm stay finite.

What must hold:

* ``nonfinite: stop`` (default): the run stops, the message names the step and the dataset
  rows; the checkpoints written before are intact and finite; nothing after.
* ``nonfinite: skip``: the step is skipped (no optimizer update: the weights after it equal
  the weights before it), a warning names the step (and rows), training continues and ends
  normally. Also with ``clip_grad_norm: null`` (the gradient norm is still checked).
* a checkpoint with non-finite weights is never written.
* ``dtype: bf16``: weights in bf16, log-softmax / per-sequence log-probs and the loss in fp32
  (in-process, on the recipe object).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from tune_harness import (
    describe,
    load_weights,
    log_rows,
    recipe_in_process,
    run_recipe,
    tiny_config,
)

N_ROWS = 24  # batch 4: 6 steps
BATCH = 4

GUARDLOSS = '''
import torch

from torchtune_prefopt.losses import DPOLoss


class FaultyDPOLoss(DPOLoss):
    """DPO; call ``nan_on_call`` returns NaN for batch row ``nan_row``, call
    ``inf_grad_on_call`` returns the same (finite) losses with an infinite gradient."""

    def __init__(self, beta: float = 0.1, nan_on_call: int = 0, nan_row: int = 0, inf_grad_on_call: int = 0):
        super().__init__(beta=beta)
        self.nan_on_call, self.nan_row, self.inf_grad_on_call = nan_on_call, nan_row, inf_grad_on_call
        self.calls = 0

    def forward(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
        losses, chosen_rewards, rejected_rewards = super().forward(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
        )
        self.calls += 1
        if self.calls == self.nan_on_call:
            bad = torch.zeros_like(losses, dtype=torch.bool)
            bad[self.nan_row] = True
            losses = losses.masked_fill(bad, float("nan"))
        if self.calls == self.inf_grad_on_call:
            losses = losses + torch.sqrt(policy_chosen_logps - policy_chosen_logps.detach())
        return losses, chosen_rewards, rejected_rewards
'''


# ----------------------------------------------------------------------------- helpers
def _config(workdir: Path, loss: Optional[dict] = None, **edits) -> Path:
    settings = {"batch_size": BATCH, "lr_scheduler.num_warmup_steps": 1, "save_every_n_steps": 1}
    if loss is not None:
        settings["loss"] = loss
    return tiny_config(workdir, "dpo", rows=N_ROWS, **{**settings, **edits})


def _run(workdir: Path, config: Path) -> subprocess.CompletedProcess:
    (workdir / "guardloss.py").write_text(GUARDLOSS)
    return run_recipe(config, cwd=workdir, env={"PYTHONPATH": str(workdir)})


def _metrics(out: Path) -> Dict[int, Dict[str, float]]:
    return {row["step"]: row for row in log_rows(out)}


def _checkpoints(out: Path) -> List[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _weights(out: Path, step: int):
    return load_weights(out / "checkpoints" / f"step_{step:06d}")


def _all_finite(sd) -> bool:
    import torch

    return all(torch.isfinite(v).all().item() for v in sd.values())


def _same(a, b) -> bool:
    import torch

    return all(torch.equal(a[k], b[k]) for k in a)


def _rows_of_step(step: int, position: int) -> int:
    """Dataset row at ``position`` of step ``step``'s batch (1 process, no accumulation, epoch 0)."""
    from torchtune_prefopt.training.data_order import GlobalBatchSampler

    sampler = GlobalBatchSampler(N_ROWS, BATCH, seed=42, shuffle=True)
    sampler.set_epoch(0)
    batches = list(sampler)
    return batches[step - 1][position]


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    from torchtune_prefopt.models.tiny import make_tiny_hf_checkpoint

    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_base") / "base")


@pytest.fixture
def workdir(tmp_path: Path, base_checkpoint: Path) -> Path:
    shutil.copytree(base_checkpoint, tmp_path / "base")
    return tmp_path


# ----------------------------------------------------------------------------- stop
@pytest.mark.slow
def test_nan_loss_stops_naming_step_and_rows(workdir: Path):
    cfg = _config(
        workdir,
        loss={
            "_component_": "guardloss.FaultyDPOLoss",
            "beta": 0.1,
            "nan_on_call": 3,
            "nan_row": 1,
        },
    )
    p = _run(workdir, cfg)
    assert p.returncode not in (0, -signal.SIGKILL), describe(p)
    row = _rows_of_step(3, 1)
    assert (
        f"step 3: non-finite loss for dataset rows [{row}] (set nonfinite=skip to skip such steps)"
        in p.stderr
    ), describe(p)
    out = workdir / "out"
    assert sorted(_metrics(out)) == [1, 2]
    assert _checkpoints(out) == [
        "step_000001",
        "step_000002",
    ]  # nothing for step 3, no .tmp- leftover
    assert _all_finite(_weights(out, 2))


@pytest.mark.slow
def test_error_line_after_the_progress_bar_starts_its_own_line(workdir: Path):
    """The bar is closed before the guard's line: ``grep '^error:'`` finds exactly one."""
    cfg = _config(
        workdir, loss={"_component_": "guardloss.FaultyDPOLoss", "beta": 0.1, "nan_on_call": 2}
    )
    p = _run(workdir, cfg)
    assert p.returncode == 3, describe(p)
    errors = re.findall(r"^error: .*$", p.stderr, re.M)
    assert len(errors) == 1 and errors[0].startswith("error: step 2: non-finite loss"), describe(p)


@pytest.mark.slow
def test_nonfinite_grad_norm_stops(workdir: Path):
    cfg = _config(
        workdir, loss={"_component_": "guardloss.FaultyDPOLoss", "beta": 0.1, "inf_grad_on_call": 2}
    )
    p = _run(workdir, cfg)
    assert p.returncode not in (0, -signal.SIGKILL), describe(p)
    assert re.search(
        r"step 2: non-finite gradient norm \((inf|nan)\) \(set nonfinite=skip", p.stderr
    ), describe(p)
    out = workdir / "out"
    assert _checkpoints(out) == ["step_000001"]
    assert _all_finite(_weights(out, 1))


# ----------------------------------------------------------------------------- skip
@pytest.mark.slow
def test_skip_mode_skips_the_step_and_continues(workdir: Path):
    """NaN loss on step 2, infinite gradient on step 4, clip_grad_norm null: both steps are
    skipped (weights unchanged), the run trains on to step 6 and exits 0."""
    cfg = _config(
        workdir,
        loss={
            "_component_": "guardloss.FaultyDPOLoss",
            "beta": 0.1,
            "nan_on_call": 2,
            "nan_row": 3,
            "inf_grad_on_call": 4,
        },
        nonfinite="skip",
        clip_grad_norm=None,
    )
    p = _run(workdir, cfg)
    assert p.returncode == 0, describe(p)
    row = _rows_of_step(2, 3)
    assert (
        f"WARNING: step 2: non-finite loss for dataset rows [{row}]; skipping this step" in p.stderr
    ), describe(p)
    assert re.search(
        r"WARNING: step 4: non-finite gradient norm \((inf|nan)\); skipping this step", p.stderr
    ), describe(p)
    out = workdir / "out"
    metrics = _metrics(out)
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6]
    assert [s for s, m in metrics.items() if m.get("skipped_step") == 1.0] == [2, 4]
    # a step whose only micro-batch was skipped logs no loss (not a made-up 0.0)
    assert "loss" not in metrics[2] and "loss" in metrics[4]
    w = {s: _weights(out, s) for s in range(1, 7)}
    assert _same(w[2], w[1]) and _same(w[4], w[3]), "a skipped step changed the weights"
    assert not _same(w[3], w[2]) and not _same(w[5], w[4]), (
        "training did not continue after a skipped step"
    )
    assert all(_all_finite(sd) for sd in w.values())


# ----------------------------------------------------------------------------- never write non-finite weights
@pytest.mark.slow
def test_nonfinite_weights_are_never_written(workdir: Path):
    """beta=1e6 (gradients ~1e5..1e7, finite), SGD lr=1e36: the first update overflows some
    weights to +-inf; the step-1 checkpoint is refused and nothing (not even a .tmp- directory)
    is left behind."""
    cfg = _config(
        workdir,
        lr_scheduler=None,
        clip_grad_norm=None,
        optimizer={"_component_": "torch.optim.SGD", "lr": 1e36},
        **{"loss.beta": 1e6},
    )
    p = _run(workdir, cfg)
    assert p.returncode not in (0, -signal.SIGKILL), describe(p)
    assert (
        "step 1: the weights contain non-finite values; refusing to write a checkpoint" in p.stderr
    ), describe(p)
    assert _checkpoints(workdir / "out") == []  # no step_000001, no .tmp-step_000001
    assert not (workdir / "out" / "final").exists()


# ----------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_bf16_keeps_logprobs_and_loss_in_fp32(tmp_path: Path, base_checkpoint: Path, loss: str):
    """In-process, on the recipe object: dtype=bf16 puts the weights in bf16; the per-sequence
    log-probs (fp32 log-softmax), the reference log-probs and the losses are fp32."""
    import torch
    from omegaconf import OmegaConf

    shutil.copytree(base_checkpoint, tmp_path / "base")
    cfg = OmegaConf.load(tiny_config(tmp_path, loss, rows=8, batch_size=4, dtype="bf16"))
    with recipe_in_process(cfg) as recipe:
        assert {p.dtype for p in recipe._model.parameters()} == {torch.bfloat16}
        recipe._sampler.set_epoch(0)
        batch = next(iter(recipe._dataloader))
        pol = batch.logps(recipe._model)
        ref = recipe._reference.logps(batch)
        assert pol.sum.dtype == pol.mean.dtype == torch.float32
        assert ref.sum.dtype == ref.mean.dtype == torch.float32
        step = recipe._paired_step if loss == "dpo" else recipe._kto_step
        losses, stats, _ = step(batch)
        assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
        assert all(v.dtype in (torch.float32, torch.float64) for v, _per in stats.values()), {
            k: v.dtype for k, (v, _per) in stats.items()
        }
        losses.mean().backward()  # gradients flow back into the bf16 weights
        grads = [p.grad for p in recipe._model.parameters() if p.grad is not None]
        assert grads and all(g.dtype == torch.bfloat16 for g in grads)
