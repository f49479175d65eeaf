"""Crash, pre-emption and resume through the real ``tune`` CLI (CPU, tiny model).

A run that is SIGKILLed at an arbitrary step, SIGKILLed in the middle of writing a checkpoint,
or pre-empted with SIGTERM, and then resumed with ``resume_from_checkpoint=True``, must end
with the same weights, optimizer state and per-step metrics as a run that was never
interrupted: bit-identical on CPU (same process count, same thread count).

How each interruption is produced:

* SIGKILL at an arbitrary step: the test polls the metric log and kills the whole process
  group once step N is logged (wherever the recipe is at that moment).
* SIGKILL while a checkpoint is being written (deterministic, no hook in the recipe): a
  ``sitecustomize.py`` on the run's PYTHONPATH wraps
  ``torchtune_prefopt.training.checkpoints.save_recipe_state``; at the chosen step it lets the
  real function write ``recipe_state.pt`` into ``.tmp-step_N``, cuts the file in half and
  sends SIGKILL to its own process, i.e. the process dies with the weights written, the
  recipe state half written, no manifest and no rename. (test_leftovers_are_ignored also
  builds such leftovers by hand.)
* SIGTERM: to the ``tune`` process (1 process), and to the torchrun agent of a 2-process
  ``tune run --nproc_per_node 2`` launch (it forwards SIGTERM to both workers).

Data: 16 synthetic pairs, batch 2, gradient accumulation 2, 2 epochs (8 steps, resume
crosses the epoch boundary), cosine schedule with warm-up, a checkpoint every 2 steps and
keep_last_n_checkpoints=2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from tune_harness import (
    TUNE,
    VOLATILE,
    clean_env,
    load_weights,
    log_rows,
    recipe_args,
    tiny_config,
)

pytestmark = pytest.mark.slow

TIMEOUT = 600

SITECUSTOMIZE = '''
"""Test hook: SIGKILL this process while it writes the step-N checkpoint (see test_crash_resume)."""
import os

_STEP = os.environ.get("PREFOPT_TEST_SIGKILL_IN_CHECKPOINT")
if _STEP:
    import signal

    from torchtune_prefopt.training import checkpoints as _ckpt

    _real = _ckpt.save_recipe_state

    def save_recipe_state(tmp, state):
        _real(tmp, state)
        if int(state["step"]) == int(_STEP):
            f = tmp / _ckpt.RECIPE_STATE
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    _ckpt.save_recipe_state = save_recipe_state
'''


# ----------------------------------------------------------------------------- helpers
def write_config(workdir: Path, loss: str = "dpo", **edits) -> Path:
    """configs/tiny/<loss>.yaml made tiny: 16 pairs, batch 2 x accum 2 (KTO: 32 unpaired rows,
    batch 4 x accum 2), 2 epochs: 8 steps."""
    settings = {
        "batch_size": 4 if loss == "kto" else 2,
        "gradient_accumulation_steps": 2,
        "epochs": 2,
        "lr_scheduler.num_warmup_steps": 2,
        "save_every_n_steps": 2,
        "keep_last_n_checkpoints": 2,
    }
    return tiny_config(workdir, loss, rows=16, **{**settings, **edits})


@dataclass
class Run:
    returncode: int
    output: str  # stdout + stderr
    seconds: float
    signalled_after_step: Optional[int] = None


def last_logged_step(out: Path) -> int:
    rows = log_rows(out) if (out / "logs").exists() else []
    return max((r["step"] for r in rows), default=0)


def run_tune(
    workdir: Path,
    config: Path,
    *overrides: str,
    nproc: int = 1,
    env: Optional[Dict[str, str]] = None,
    signal_after_step: Optional[int] = None,
    sig: int = signal.SIGKILL,
    to_group: bool = True,
) -> Run:
    """Run the recipe; optionally send ``sig`` once step ``signal_after_step`` is logged (to the
    whole process group, or to the ``tune`` process only)."""
    cmd = [str(TUNE), *recipe_args(config, *overrides, nproc=nproc)]
    log = workdir / f"run_{time.time_ns()}.log"
    out = Path(config.parent / "out")
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=clean_env(env),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        signalled = None
        try:
            while proc.poll() is None and signal_after_step is not None and signalled is None:
                step = last_logged_step(out)
                if step >= signal_after_step:
                    signalled = step
                    (os.killpg if to_group else os.kill)(proc.pid, sig)
                    break
                if time.perf_counter() - start > TIMEOUT:
                    break
                time.sleep(0.02)
            proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return Run(proc.returncode, log.read_text(), time.perf_counter() - start, signalled)


def describe(run: Run) -> str:
    return f"exit {run.returncode} after {run.seconds:.0f}s\n{run.output[-5000:]}"


def checkpoints(out: Path) -> List[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def load_state(step_dir: Path):
    import torch

    return torch.load(step_dir / "recipe_state.pt", map_location="cpu", weights_only=True)


def assert_tensors_equal(a, b, what: str, atol: float = 0.0) -> None:
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, what
        if atol == 0.0:
            assert torch.equal(a, b), (
                f"{what}: max |diff| {(a.double() - b.double()).abs().max().item():.3g}"
            )
        else:
            assert torch.allclose(a, b, atol=atol, rtol=0), (
                f"{what}: max |diff| {(a.double() - b.double()).abs().max().item():.3g}"
            )
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{what}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_tensors_equal(a[k], b[k], f"{what}.{k}", atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tensors_equal(x, y, f"{what}[{i}]", atol)
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def assert_metrics_match(
    reference: List[Dict[str, float]], got: List[Dict[str, float]], rel: float = 0.0
) -> None:
    """Every logged step (a step logged twice, before a crash and after the resume, is checked
    both times) has the reference's metrics: exactly, or within ``rel`` relative error."""
    ref = {r["step"]: r for r in reference}
    assert {r["step"] for r in got} == set(ref), (sorted({r["step"] for r in got}), sorted(ref))
    for row in got:
        want = ref[row["step"]]
        for key in set(want) - VOLATILE:
            if rel == 0.0:
                assert row[key] == want[key], (
                    f"step {row['step']} {key}: {row[key]!r} != {want[key]!r}"
                )
            else:
                assert row[key] == pytest.approx(want[key], rel=rel, abs=1e-4), (
                    f"step {row['step']} {key}"
                )


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    from torchtune_prefopt.models.tiny import make_tiny_hf_checkpoint

    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_base") / "base")


def _workdir(tmp_path_factory, name: str, base: Path) -> Path:
    d = tmp_path_factory.mktemp(name)
    shutil.copytree(base, d / "base")
    return d


@dataclass
class Reference:
    out: Path
    metrics: List[Dict[str, float]]
    seconds: float


def _reference(tmp_path_factory, base: Path, loss: str) -> Reference:
    d = _workdir(tmp_path_factory, f"reference_{loss}", base)
    run = run_tune(d, write_config(d, loss))
    assert run.returncode == 0, describe(run)
    out = d / "out"
    assert checkpoints(out) == ["step_000006", "step_000008"], checkpoints(out)
    return Reference(out, log_rows(out), run.seconds)


@pytest.fixture(scope="module")
def dpo_reference(tmp_path_factory, base_checkpoint) -> Reference:
    return _reference(tmp_path_factory, base_checkpoint, "dpo")


@pytest.fixture(scope="module")
def kto_reference(tmp_path_factory, base_checkpoint) -> Reference:
    return _reference(tmp_path_factory, base_checkpoint, "kto")


@pytest.fixture(scope="module")
def ipo_reference(tmp_path_factory, base_checkpoint) -> Reference:
    return _reference(tmp_path_factory, base_checkpoint, "ipo")


def assert_same_final_state(reference: Reference, out: Path) -> None:
    ref_dir, got_dir = (
        reference.out / "checkpoints" / "step_000008",
        out / "checkpoints" / "step_000008",
    )
    assert_tensors_equal(load_weights(ref_dir), load_weights(got_dir), "weights")
    ref_state, got_state = load_state(ref_dir), load_state(got_dir)
    assert_tensors_equal(ref_state["optimizer"], got_state["optimizer"], "optimizer")
    assert_tensors_equal(ref_state["lr_scheduler"], got_state["lr_scheduler"], "lr_scheduler")
    assert_tensors_equal(ref_state["rng_states"], got_state["rng_states"], "rng")
    for key in ("step", "epoch", "micro_in_epoch"):
        assert ref_state[key] == got_state[key], key


# ----------------------------------------------------------------------------- DPO: a chain of interruptions
@dataclass
class Chain:
    out: Path
    runs: Dict[str, Run]
    after: Dict[str, List[str]]  # checkpoint dir listing after each run
    kill_step: (
        int  # the checkpoint whose writing was SIGKILLed (the first save after the SIGTERM one)
    )
    tmp_listing: List[str]  # .tmp-step_<kill_step> content right after the mid-checkpoint kill
    sigterm_manifest: dict  # CHECKPOINT.json of the checkpoint the SIGTERM run wrote


@pytest.fixture(scope="module")
def dpo_chain(tmp_path_factory, base_checkpoint) -> Chain:
    """sigterm (step 1-2) -> resume+SIGKILL inside the next checkpoint (step 2-4) -> resume+SIGKILL
    after step 6 -> resume to the end."""
    d = _workdir(tmp_path_factory, "chain_dpo", base_checkpoint)
    cfg = write_config(d, "dpo")
    hooks = d / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = d / "out"
    runs, after = {}, {}
    # A: pre-empted (SIGTERM to the tune process) as soon as step 1 is logged.
    runs["sigterm"] = run_tune(d, cfg, signal_after_step=1, sig=signal.SIGTERM, to_group=False)
    after["sigterm"] = checkpoints(out)
    newest = [c for c in after["sigterm"] if c.startswith("step_")]
    sigterm_manifest = (
        json.loads((out / "checkpoints" / newest[-1] / "CHECKPOINT.json").read_text())
        if newest
        else {}
    )
    # B: resumed, then SIGKILLed while writing its first checkpoint (save_every_n_steps=2).
    resumed_at = sigterm_manifest.get("step", 0)
    kill_step = (resumed_at // 2 + 1) * 2
    assert kill_step <= 6, (
        f"the SIGTERM run went on to step {resumed_at}: {describe(runs['sigterm'])}"
    )
    runs["kill_in_checkpoint"] = run_tune(
        d,
        cfg,
        "resume_from_checkpoint=True",
        env={"PYTHONPATH": str(hooks), "PREFOPT_TEST_SIGKILL_IN_CHECKPOINT": str(kill_step)},
    )
    after["kill_in_checkpoint"] = checkpoints(out)
    tmp = out / "checkpoints" / f".tmp-step_{kill_step:06d}"
    tmp_listing = sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []
    # C: resumed, then SIGKILLed (whole process group) once step 6 is logged.
    runs["kill_at_step"] = run_tune(d, cfg, "resume_from_checkpoint=True", signal_after_step=6)
    after["kill_at_step"] = checkpoints(out)
    # D: resumed to the end.
    runs["final"] = run_tune(d, cfg, "resume_from_checkpoint=True")
    after["final"] = checkpoints(out)
    return Chain(out, runs, after, kill_step, tmp_listing, sigterm_manifest)


def test_sigterm_saves_at_next_step_boundary_and_exits_0(dpo_chain: Chain):
    run = dpo_chain.runs["sigterm"]
    assert run.returncode == 0, describe(run)
    assert "Traceback" not in run.output, describe(run)
    saved = [c for c in dpo_chain.after["sigterm"] if c.startswith("step_")]
    last = saved[-1]
    step = int(last.split("_")[1])
    # The signal came once step 1 was logged: the checkpoint is at the step boundary that
    # followed (1, or 2 if step 2 was already under way), the run stopped there.
    assert run.signalled_after_step is not None and 1 <= step <= run.signalled_after_step + 1, (
        saved,
        run.signalled_after_step,
    )
    manifest = dpo_chain.sigterm_manifest
    assert manifest["reason"] == "sigterm" and manifest["step"] == step, manifest
    assert f"SIGTERM: saved {dpo_chain.out / 'checkpoints' / last} at step {step}" in run.output
    assert (
        f"Resuming from {dpo_chain.out / 'checkpoints' / last}"
        in dpo_chain.runs["kill_in_checkpoint"].output
    )


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_usable(dpo_chain: Chain):
    run = dpo_chain.runs["kill_in_checkpoint"]
    assert run.returncode == -signal.SIGKILL, describe(run)
    listing = dpo_chain.after["kill_in_checkpoint"]
    # The half-written checkpoint stayed a .tmp- directory: weights, half a recipe state, no manifest.
    name = f"step_{dpo_chain.kill_step:06d}"
    assert f".tmp-{name}" in listing and name not in listing, listing
    assert (
        "recipe_state.pt" in dpo_chain.tmp_listing
        and "CHECKPOINT.json" not in dpo_chain.tmp_listing
    ), dpo_chain.tmp_listing
    assert any(f.endswith(".safetensors") for f in dpo_chain.tmp_listing), dpo_chain.tmp_listing
    # The next run ignored it, resumed from the newest complete checkpoint and removed it on its next save.
    newest = [c for c in listing if c.startswith("step_")][-1]
    assert (
        f"Resuming from {dpo_chain.out / 'checkpoints' / newest}"
        in dpo_chain.runs["kill_at_step"].output
    )
    assert not any(c.startswith(".tmp-") for c in dpo_chain.after["final"]), dpo_chain.after[
        "final"
    ]


def test_sigkill_at_an_arbitrary_step_then_resume(dpo_chain: Chain):
    run = dpo_chain.runs["kill_at_step"]
    assert run.returncode == -signal.SIGKILL, describe(run)
    final = dpo_chain.runs["final"]
    assert final.returncode == 0, describe(final)
    newest = [c for c in dpo_chain.after["kill_at_step"] if c.startswith("step_")][-1]
    assert f"Resuming from {dpo_chain.out / 'checkpoints' / newest}" in final.output


def test_interrupted_dpo_run_is_bit_identical_to_an_uninterrupted_one(
    dpo_chain: Chain, dpo_reference: Reference
):
    assert dpo_chain.runs["final"].returncode == 0, describe(dpo_chain.runs["final"])
    got = log_rows(dpo_chain.out)
    # Steps after a crash point were logged twice (before the SIGKILL and after the resume).
    assert len(got) > 8
    assert_metrics_match(dpo_reference.metrics, got)
    assert_same_final_state(dpo_reference, dpo_chain.out)


def test_keep_last_n_checkpoints_prunes(dpo_chain: Chain):
    assert dpo_chain.after["final"] == ["step_000006", "step_000008"], dpo_chain.after["final"]
    assert os.readlink(dpo_chain.out / "final") == os.path.join("checkpoints", "step_000008")
    # A run that ended on its own (or on SIGTERM) keeps 2. A SIGKILL can land between the
    # publishing of a new checkpoint and the pruning of the oldest: one extra, never fewer
    # (pruning comes after the new one is complete), and the next save prunes it.
    for name, listing in dpo_chain.after.items():
        killed = dpo_chain.runs[name].returncode == -signal.SIGKILL
        n = len([c for c in listing if c.startswith("step_")])
        assert 1 <= n <= (3 if killed else 2), (name, listing)


# ----------------------------------------------------------------------------- KTO
def test_kto_sigkill_and_resume_is_bit_identical(
    tmp_path_factory, base_checkpoint, kto_reference: Reference
):
    d = _workdir(tmp_path_factory, "kill_kto", base_checkpoint)
    cfg = write_config(d, "kto")
    killed = run_tune(d, cfg, signal_after_step=3)
    assert killed.returncode == -signal.SIGKILL, describe(killed)
    newest = checkpoints(d / "out")[-1]
    resumed = run_tune(d, cfg, "resume_from_checkpoint=True")
    assert resumed.returncode == 0, describe(resumed)
    assert f"Resuming from {d / 'out' / 'checkpoints' / newest}" in resumed.output
    assert_metrics_match(kto_reference.metrics, log_rows(d / "out"))
    assert_same_final_state(kto_reference, d / "out")


# ----------------------------------------------------------------------------- leftovers, hand-made
def test_leftovers_are_ignored_and_newest_complete_checkpoint_is_used(
    tmp_path, dpo_reference: Reference
):
    """A hand-made .tmp-step_000007 (truncated weights, no manifest) and a step_000007 without a
    manifest are not checkpoints: the newest complete one (step 6) is found."""
    from torchtune_prefopt.training import checkpoints as ckpt

    out = tmp_path / "out"
    shutil.copytree(
        dpo_reference.out / "checkpoints" / "step_000006", out / "checkpoints" / "step_000006"
    )
    for name in (".tmp-step_000007", "step_000007"):
        partial = out / "checkpoints" / name
        partial.mkdir()
        data = (
            out / "checkpoints" / "step_000006" / "model-00001-of-00001.safetensors"
        ).read_bytes()
        (partial / "model-00001-of-00001.safetensors").write_bytes(data[: len(data) // 2])
    assert ckpt.latest_checkpoint(out) == out / "checkpoints" / "step_000006"
    ckpt.verify_checkpoint(out / "checkpoints" / "step_000006")
    # The next save clears .tmp- leftovers; pruning keeps the newest N complete ones.
    tmp = ckpt.begin_checkpoint(out, 8)
    assert not (out / "checkpoints" / ".tmp-step_000007").exists()
    (tmp / "x.bin").write_bytes(b"1")
    ckpt.commit_checkpoint(tmp, 8)
    assert ckpt.latest_checkpoint(out).name == "step_000008"
    assert [p.name for p in ckpt.prune_checkpoints(out, 1)] == ["step_000006"]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_000008"]
    # Pruned folders were hidden (renamed .tmp-pruned-) before their deletion, then deleted.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_000007",  # the hand-made partial folder: no manifest, never listed
        "step_000008",
    ]


# ----------------------------------------------------------------------------- 2 processes
def test_ctrl_c_stops_like_sigterm(tmp_path, base_checkpoint):
    """SIGINT (Ctrl-C in the terminal: the whole foreground process group) is the same clean
    stop as SIGTERM: a checkpoint at the next step boundary, one line naming it, exit 0, no
    KeyboardInterrupt traceback; and the run resumes from that checkpoint."""
    shutil.copytree(base_checkpoint, tmp_path / "base")
    cfg = write_config(tmp_path, "dpo")
    run = run_tune(tmp_path, cfg, signal_after_step=1, sig=signal.SIGINT)
    assert run.returncode == 0, describe(run)
    assert "Traceback" not in run.output and "KeyboardInterrupt" not in run.output, describe(run)
    out = tmp_path / "out"
    saved = [c for c in checkpoints(out) if c.startswith("step_")]
    step = int(saved[-1].split("_")[1])
    assert 1 <= step <= run.signalled_after_step + 1, (saved, describe(run))
    manifest = json.loads((out / "checkpoints" / saved[-1] / "CHECKPOINT.json").read_text())
    assert manifest["reason"] == "sigint" and manifest["step"] == step, manifest
    assert f"SIGINT: saved {out / 'checkpoints' / saved[-1]} at step {step}" in run.output
    resumed = run_tune(tmp_path, cfg, "resume_from_checkpoint=True")
    assert resumed.returncode == 0, describe(resumed)
    assert f"Resuming from {out / 'checkpoints' / saved[-1]}" in resumed.output


def test_ctrl_c_to_a_two_process_launch(tmp_path, base_checkpoint):
    """Ctrl-C in the terminal of ``tune run --nproc_per_node 2``: SIGINT reaches the torchrun
    agent and both workers (one process group). The workers stop as one process does: one
    checkpoint at the next step boundary, its one line, no rank traceback, no
    KeyboardInterrupt; it resumes. torchrun's agent itself reports the signal it got (its
    own SignalException, status 1), as it does for SIGTERM."""
    shutil.copytree(base_checkpoint, tmp_path / "base")
    cfg = write_config(tmp_path, "dpo", batch_size=1)
    run = run_tune(tmp_path, cfg, nproc=2, signal_after_step=1, sig=signal.SIGINT)
    assert run.returncode in (0, 1), describe(run)
    assert "[rank0]:" not in run.output and "[rank1]:" not in run.output, describe(run)
    assert "KeyboardInterrupt" not in run.output, describe(run)
    assert "closing signal SIGKILL" not in run.output, describe(run)
    out = tmp_path / "out"
    saved = [c for c in checkpoints(out) if c.startswith("step_")]
    assert len(saved) == 1, (saved, describe(run))
    step = int(saved[0].split("_")[1])
    manifest = json.loads((out / "checkpoints" / saved[0] / "CHECKPOINT.json").read_text())
    assert manifest["reason"] == "sigint" and manifest["step"] == step, manifest
    assert f"SIGINT: saved {out / 'checkpoints' / saved[0]} at step {step}" in run.output
    resumed = run_tune(tmp_path, cfg, "resume_from_checkpoint=True", nproc=2)
    assert resumed.returncode == 0, describe(resumed)
    assert f"Resuming from {out / 'checkpoints' / saved[0]}" in resumed.output


def test_sigterm_to_a_two_process_launch(tmp_path, base_checkpoint, dpo_reference: Reference):
    """SIGTERM to the torchrun agent of ``tune run --nproc_per_node 2``: it forwards the signal,
    both ranks save one checkpoint at the next step boundary and exit 0 (recorded by an os._exit
    hook), and the run resumes, here on 1 process with the same global batch (elastic shrink)."""
    shutil.copytree(base_checkpoint, tmp_path / "base")
    cfg = write_config(
        tmp_path, "dpo", batch_size=1
    )  # 2 ranks x 1 = the reference's global batch 2
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        textwrap.dedent("""
        import atexit, os, sys
        if "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
            _code = ["no sys.exit"]
            _real_exit, _real_os_exit = sys.exit, os._exit
            def _exit(code=0):
                _code[0] = code
                _real_exit(code)
            sys.exit = _exit
            def _record():
                with open(os.path.join(os.environ["PREFOPT_TEST_EXIT_DIR"], "rank%s" % os.environ["RANK"]), "w") as f:
                    f.write(repr(_code[0]))
            atexit.register(_record)
            def _os_exit(code):  # a finished rank of several leaves without teardown
                _code[0] = "os._exit(%r)" % code
                _record()
                _real_os_exit(code)
            os._exit = _os_exit
    """)
    )
    exits = tmp_path / "exits"
    exits.mkdir()
    run = run_tune(
        tmp_path,
        cfg,
        nproc=2,
        signal_after_step=1,
        sig=signal.SIGTERM,
        to_group=False,
        env={"PYTHONPATH": str(hooks), "PREFOPT_TEST_EXIT_DIR": str(exits)},
    )
    out = tmp_path / "out"
    saved = [c for c in checkpoints(out) if c.startswith("step_")]
    step = int(saved[-1].split("_")[1])
    assert 1 <= step <= run.signalled_after_step + 1, (saved, describe(run))
    assert (
        json.loads((out / "checkpoints" / saved[-1] / "CHECKPOINT.json").read_text())["reason"]
        == "sigterm"
    )
    assert f"SIGTERM: saved {out / 'checkpoints' / saved[-1]} at step {step}" in run.output, (
        describe(run)
    )
    # Each rank returned normally from the recipe and left with status 0: a finished rank of
    # several leaves through os._exit(0) (training.distributed.exit_after)
    ranks = {f.name: f.read_text() for f in exits.iterdir()}
    assert ranks == {"rank0": "'os._exit(0)'", "rank1": "'os._exit(0)'"}, describe(run)
    assert "[rank0]:" not in run.output and "[rank1]:" not in run.output, describe(
        run
    )  # no rank tracebacks
    # torchrun itself re-raises the signal after its workers exited (torch.distributed.elastic
    # behaviour, not the recipe's): the agent's status is 1.
    assert "closing signal SIGKILL" not in run.output, describe(run)
    assert run.returncode in (0, 1), describe(run)

    resumed = run_tune(tmp_path, cfg, "resume_from_checkpoint=True", "batch_size=2")
    assert resumed.returncode == 0, describe(resumed)
    assert f"Resuming from {out / 'checkpoints' / saved[-1]}" in resumed.output
    # 2 ranks sum gradients in another order than 1 rank: equal up to float32 rounding.
    assert_metrics_match(dpo_reference.metrics, log_rows(out), rel=1e-5)
    ref_w = load_weights(dpo_reference.out / "checkpoints" / "step_000008")
    assert_tensors_equal(
        ref_w, load_weights(out / "checkpoints" / "step_000008"), "weights", atol=1e-4
    )


@pytest.mark.parametrize("loss", ["ipo", "kto"])
def test_two_processes_with_accumulation_match_one(request, tmp_path, base_checkpoint, loss):
    """2 processes x gradient accumulation 2 = 1 process x accumulation 2 with the same global
    micro-batch, for the losses tests/test_recipe_e2e.py runs on 2 processes *without*
    accumulation (DPO: test_sigterm_to_a_two_process_launch; SimPO: test_recipe_e2e). KTO is the
    interesting one: its KL reference point z0 is all-reduced over ranks per micro-batch."""
    reference: Reference = request.getfixturevalue(f"{loss}_reference")
    shutil.copytree(base_checkpoint, tmp_path / "base")
    per_rank = {"ipo": 1, "kto": 2}[loss]  # half the 1-process batch
    cfg = write_config(tmp_path, loss, batch_size=per_rank)
    run = run_tune(tmp_path, cfg, nproc=2)
    assert run.returncode == 0, describe(run)
    out = tmp_path / "out"
    assert load_state(out / "checkpoints" / "step_000008")["world_size"] == 2
    assert_metrics_match(reference.metrics, log_rows(out), rel=1e-5)
    ref_w = load_weights(reference.out / "checkpoints" / "step_000008")
    assert_tensors_equal(
        ref_w, load_weights(out / "checkpoints" / "step_000008"), "weights", atol=1e-4
    )
