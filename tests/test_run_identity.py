"""A run's identity and its checkpoints: a finished run never loses its own weights and never
adopts another run's; checkpoints are verified by content (xxh3-128), not only by size.

Runs are in-process (`tune_harness.run_in_process`, the recipe's ``run(cfg)``), tiny: 8 pairs,
batch 4 -> 2 steps per epoch, a checkpoint every step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.training import checkpoints as ckpt
from tune_harness import load_weights, log_rows, run_in_process, tiny_config


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from torchtune_prefopt.models.tiny import make_tiny_hf_checkpoint

    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_base") / "base")


def _config(workdir: Path, base: Path, **edits):
    shutil.copytree(base, workdir / "base", dirs_exist_ok=True)
    settings = {"batch_size": 4, "save_every_n_steps": 1, "lr_scheduler.num_warmup_steps": 0}
    return OmegaConf.load(tiny_config(workdir, "dpo", rows=8, **{**settings, **edits}))


def _run_id(step_dir: Path) -> str:
    return ckpt.read_manifest(step_dir)["run"]["id"]


def _snapshot(d: Path) -> dict:
    return {
        str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*")) if p.is_file()
    }


def test_the_same_run_again_is_done_another_refuses_overwrite_replaces(tmp_path, base):
    cfg = _config(tmp_path, base)
    run_in_process(cfg)
    out = tmp_path / "out"
    first = _run_id(out / "final")
    assert (out / "final").resolve().name == "step_000002"
    before, first_weights = _snapshot(out), load_weights(out / "final")

    # the same config again (the common case: a packaged config's fixed output_dir): the
    # same run, finished: nothing to do (exit 0 from the CLI), nothing touched
    from torchtune_prefopt.errors import AlreadyFinished

    with pytest.raises(AlreadyFinished) as done:
        run_in_process(cfg)
    assert "already holds this run, finished" in str(done.value) and "nothing to do" in str(
        done.value
    )
    assert _snapshot(out) == before

    # one setting changed, same output_dir: another run, refused, naming what differs and
    # not suggesting a resume (which would be refused: the loss differs)
    with pytest.raises(PrefOptUserError) as err:
        run_in_process(_config(tmp_path, base, **{"loss.beta": 0.5}))
    msg = str(err.value)
    assert f"already holds run {first}" in msg and "step_000002" in msg
    assert "a run with other settings (loss differ from this config)" in msg, msg
    for way in ("output_dir=<another directory>", "overwrite_output_dir=true"):
        assert way in msg
    assert "resume_from_checkpoint=True" not in msg
    assert _snapshot(out) == before  # nothing touched

    # the same settings, an unfinished run (no final link): a resume is what continues it
    final = (out / "final").resolve()
    (out / "final").unlink()
    with pytest.raises(PrefOptUserError) as err:
        run_in_process(cfg)
    assert "continue it with resume_from_checkpoint=True" in str(err.value), str(err.value)
    (out / "final").symlink_to(final)
    assert _snapshot(out) == before

    # explicit overwrite, with one setting changed: a new run, its own weights
    cfg2 = _config(tmp_path, base, overwrite_output_dir=True, **{"loss.beta": 0.5})
    run_in_process(cfg2)
    second = _run_id(out / "final")
    assert second != first
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    assert all(_run_id(p) == second for p in (out / "checkpoints").iterdir())
    assert len(list((out / "logs").glob("*.txt"))) == 1  # the old run's log went with it
    second_weights = load_weights(out / "final")  # this run's, not the first run's
    assert any(not torch.equal(v, second_weights[k]) for k, v in first_weights.items())


def test_resume_continues_only_its_own_run(tmp_path, base):
    cfg = _config(tmp_path, base)
    run_in_process(cfg)
    out = tmp_path / "out"
    run_id = _run_id(out / "final")

    # other settings: refused, naming what differs
    changed = _config(
        tmp_path, base, resume_from_checkpoint=True, **{"loss.beta": 0.2, "optimizer.lr": 1e-3}
    )
    with pytest.raises(PrefOptUserError) as err:
        run_in_process(changed)
    assert f"belongs to run {run_id}" in str(err.value)
    assert "loss, optimizer differ from this config" in str(err.value)

    # the same settings, from the step-1 checkpoint: continues the same run to the end
    shutil.rmtree(out / "checkpoints" / "step_000002")
    (out / "final").unlink()
    run_in_process(_config(tmp_path, base, resume_from_checkpoint=True))
    assert _run_id(out / "final") == run_id
    assert (out / "final").resolve().name == "step_000002"


def test_resuming_a_finished_run_keeps_its_final_checkpoint(tmp_path, base):
    run_in_process(_config(tmp_path, base))
    out = tmp_path / "out"
    final = (out / "final").resolve()
    before = _snapshot(final)
    run_in_process(_config(tmp_path, base, resume_from_checkpoint=True))
    assert (out / "final").resolve() == final and _snapshot(final) == before


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("victim", ["weights", "recipe_state"])
def test_a_flipped_byte_is_detected_on_resume(tmp_path, base, victim):
    run_in_process(_config(tmp_path, base))
    out = tmp_path / "out"
    step = out / "checkpoints" / "step_000002"
    if victim == "weights":
        f = step / "model-00001-of-00001.safetensors"
        header = 8 + int.from_bytes(f.read_bytes()[:8], "little")
        _flip_byte(f, header + (f.stat().st_size - header) // 2)  # inside tensor data
    else:
        f = step / ckpt.RECIPE_STATE
        _flip_byte(f, f.stat().st_size // 2)
    size = f.stat().st_size
    with pytest.raises(PrefOptUserError) as err:
        run_in_process(_config(tmp_path, base, resume_from_checkpoint=True))
    assert str(err.value) == (
        f"checkpoint file {f} is damaged: its content does not match the xxh3-128 checksum "
        "recorded when it was written"
    )
    assert f.stat().st_size == size


def test_verification_is_split_over_ranks(tmp_path, base):
    """Each rank checks every world_size-th file; exactly one rank's share holds a damaged file."""
    run_in_process(_config(tmp_path, base))
    step = tmp_path / "out" / "checkpoints" / "step_000002"
    files = sorted(ckpt.read_manifest(step)["files"])
    victim = files[3]
    _flip_byte(step / victim, 0)
    outcomes = []
    for rank in range(2):
        try:
            ckpt.verify_checkpoint(step, rank, 2)
            outcomes.append(None)
        except PrefOptUserError as err:
            outcomes.append(str(err))
    assert sum(o is not None for o in outcomes) == 1
    assert victim in next(o for o in outcomes if o is not None)
    assert outcomes[3 % 2] is not None  # file k is checked by rank k mod world_size


def test_manifest_records_size_checksum_and_run(tmp_path, base):
    run_in_process(_config(tmp_path, base))
    step = tmp_path / "out" / "checkpoints" / "step_000001"
    manifest = json.loads((step / ckpt.MANIFEST).read_text())
    for rel, entry in manifest["files"].items():
        assert entry["size"] == (step / rel).stat().st_size
        assert entry["xxh3_128"] == ckpt.file_checksum(step / rel)
    assert set(manifest["run"]["settings"]) == set(ckpt.IDENTITY_KEYS)


def test_logged_lr_is_the_rate_the_step_used(tmp_path, base):
    """Warm-up of 2 steps (cosine schedule): step 1 runs at lr 0, step 2 at half the peak."""
    run_in_process(
        _config(tmp_path, base, **{"lr_scheduler.num_warmup_steps": 2, "optimizer.lr": 2e-3})
    )
    lrs = [row["lr"] for row in log_rows(tmp_path / "out")]
    assert lrs == [0.0, pytest.approx(1e-3, rel=1e-12)]
    w1 = load_weights(tmp_path / "out" / "checkpoints" / "step_000001")
    w0 = load_weights(base)
    # lr 0 at step 1: AdamW with weight_decay 0 leaves the weights exactly as they were
    assert all(torch.equal(w1[k], w0[k]) for k in w0 if k in w1)


def test_an_hf_folder_at_another_path_is_the_same_run(tmp_path):
    """``model_dir`` is a path: the same model files moved elsewhere are the same run (its
    config.json and weight bytes are the identity), a changed config.json is another one."""
    import json as _json

    from hf_families import make_family_folder

    from torchtune_prefopt import _config
    from torchtune_prefopt.errors import AlreadyFinished
    from tune_harness import CPU_FP32, NO_EVAL, synthetic_rows, write_jsonl

    first = make_family_folder("qwen2", tmp_path / "a" / "model")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_rows(4))

    def cfg(model_dir):
        return _config.load_config(
            ["--config", "hf/dpo", f"model_dir={model_dir}", *CPU_FP32, *NO_EVAL,
             "optimizer.fused=false", "dataset.source=json", "dataset.split=train",
             f"dataset.data_files={pairs}", "batch_size=2", "gradient_accumulation_steps=1",
             "lr_scheduler=null", "save_every_n_steps=null", "max_steps_per_epoch=1",
             f"output_dir={tmp_path / 'out'}"]
        )  # fmt: skip

    run_in_process(cfg(first))
    moved = tmp_path / "b" / "model"
    shutil.copytree(first, moved)
    shutil.rmtree(first)
    with pytest.raises(AlreadyFinished):  # the same run, finished: nothing to do
        run_in_process(cfg(moved))
    config = _json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(_json.dumps({**config, "rms_norm_eps": 1e-5}))
    with pytest.raises(
        PrefOptUserError, match=r"a run with other settings \(checkpointer, model differ"
    ):
        run_in_process(cfg(moved))
