"""Trust, part three: the pieces fit before compute, writes may fail without losing anything,
one run per output_dir, a run's identity is its content, signals.

Each class is a test (or a table of cases): start-up checks run the recipe's ``run(cfg)`` in
this process (``tune_harness.run_in_process``), a few real ``tune run`` subprocesses check
exit codes. Disk-full and read-only cases mount a small tmpfs (root only: skipped, with the
reason, where mounting is not allowed).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import torch
from omegaconf import OmegaConf

from torchtune_prefopt.errors import EXIT_WRITE_FAILED, PrefOptUserError, debug_enabled
from torchtune_prefopt.training import checkpoints as ckpt
from torchtune_prefopt.training.run_lock import LOCK_NAME, OutputDirLock
from tune_harness import (
    TUNE,
    clean_env,
    log_rows,
    recipe_args,
    run_in_process,
    synthetic_rows,
    tiny_config,
    write_jsonl,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from torchtune_prefopt.models.tiny import make_tiny_hf_checkpoint

    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_base") / "base")


def _config(workdir: Path, base: Path, loss: str = "dpo", **edits):
    shutil.copytree(base, workdir / "base", dirs_exist_ok=True)
    settings = {"batch_size": 4, "epochs": 1, "lr_scheduler.num_warmup_steps": 0}
    return OmegaConf.load(tiny_config(workdir, loss, rows=8, **{**settings, **edits}))


def _error(cfg) -> str:
    with pytest.raises(PrefOptUserError) as err:
        run_in_process(cfg)
    msg = str(err.value)
    assert "\n" not in msg, msg
    dump = os.environ.get("PREFOPT_TEST_DUMP_ERRORS")  # for the README's table
    if dump:
        with open(dump, "a") as fh:
            fh.write(msg + "\n")
    return msg


def _hf_checkpoint(path: Path, **changes) -> Path:
    """An HF Qwen2 checkpoint like the tiny one with ``changes`` to its config."""
    from transformers import Qwen2ForCausalLM

    from torchtune_prefopt.models.tiny import tiny_hf_config

    config = tiny_hf_config()
    for k, v in changes.items():
        setattr(config, k, v)
    if getattr(config, "layer_types", None):  # transformers 5: one entry per layer
        config.layer_types = [config.layer_types[0]] * config.num_hidden_layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).to(torch.float32).save_pretrained(str(path))
    return path


def _checkpointer(path: Path, out: str = "${output_dir}") -> dict:
    return {
        "_component_": "torchtune.training.FullModelHFCheckpointer",
        "checkpoint_dir": str(path),
        "checkpoint_files": ["model.safetensors"],
        "model_type": "QWEN2",
        "output_dir": out,
    }


# ----------------------------------------------------------------------------- the pieces fit
def test_tokenizer_ids_beyond_the_models_vocabulary(tmp_path, base):
    from torchtune_prefopt.models.tiny import _qwen2_kwargs

    small = {**_qwen2_kwargs(), "vocab_size": 600}
    model = {"_component_": "torchtune.models.qwen2._component_builders.qwen2", **small}
    msg = _error(_config(tmp_path, base, model=model))
    assert msg.startswith("tokenizer: its pad_id is 645, but the model's embedding has 600 rows")
    assert not (tmp_path / "out").exists()


def test_token_ids_of_a_row_beyond_the_vocabulary():
    from torchtune_prefopt.data import check_fits_context

    rows = [
        {"chosen_input_ids": [1, 2, 3], "rejected_input_ids": [1, 2, 4]},
        {"chosen_input_ids": [1, 99, 3], "rejected_input_ids": [1, 2, 4]},
    ]
    check_fits_context(rows, "dataset", 16, vocab_size=100)  # ids 0..99 fit
    bad = [rows[0], {"chosen_input_ids": [1], "rejected_input_ids": [100]}]
    with pytest.raises(PrefOptUserError, match=r"^dataset: row 1 has token id 100, outside the model's vocabulary of 100 \(ids 0\.\.99\)"):  # fmt: skip
        check_fits_context(bad, "dataset", 16, vocab_size=100)
    kto = [{"prompt_ids": [1, 2], "completion_ids": [-1]}]
    with pytest.raises(PrefOptUserError, match=r"row 0 has token id -1"):
        check_fits_context(kto, "eval_dataset", 16, vocab_size=100)


@pytest.mark.parametrize(
    "key,layers,expect",
    [
        # named as in the checkpoint's files (HF names), not by torchtune's parameter names
        ("checkpointer", 3, "weight 'model.layers.2."),
        ("checkpointer", 1, "missing weight 'model.layers.1."),
        ("ref_checkpointer", 3, "weight 'model.layers.2."),
    ],
    ids=["policy-extra-layer", "policy-missing-layer", "reference-extra-layer"],
)
def test_checkpoint_of_another_depth(tmp_path, base, key, layers, expect):
    other = _hf_checkpoint(tmp_path / f"hf{layers}", num_hidden_layers=layers)
    cfg = _config(tmp_path, base, **{key: _checkpointer(other)})
    msg = _error(cfg)
    assert f"checkpoint {other}: " in msg and expect in msg, msg
    if layers == 3:
        assert "is not in the model (" in msg
    assert not (tmp_path / "out").exists()  # no empty output_dir left behind


def test_checkpoint_dir_without_config_json(tmp_path, base):
    weights = tmp_path / "weights"
    shutil.copytree(base, weights)
    (weights / "config.json").unlink()
    msg = _error(_config(tmp_path, base, checkpointer=_checkpointer(weights)))
    assert msg.startswith(f"checkpointer.checkpoint_dir: {weights} has no config.json"), msg


def test_lora_adapter_only_step_folder_names_what_to_point_at(tmp_path, base):
    run = tmp_path / "lora_run"
    tmp = ckpt.begin_checkpoint(run, 2)
    shutil.copy(base / "config.json", tmp / "config.json")
    (tmp / "adapter_model.safetensors").write_bytes(b"")
    step = ckpt.commit_checkpoint(tmp, 2, extra={"reason": "periodic", "model_weights": False})
    msg = _error(_config(tmp_path, base, checkpointer=_checkpointer(step)))
    assert "is a LoRA step checkpoint that holds only the adapter" in msg
    assert f"resume it in its own output_dir ({run})" in msg and str(run / "final") in msg


@pytest.mark.parametrize(
    "edits,expect",
    [
        ({"model._component_": "torchtune_prefopt.models.tiny.lora_tiny_qwen2", "model.lora_dropout": 1.0}, "model.lora_dropout must be a number in [0, 1), got 1.0"),
        ({"model._component_": "torchtune_prefopt.models.tiny.lora_tiny_qwen2", "model.lora_dropout": -0.1}, "model.lora_dropout must be a number in [0, 1), got -0.1"),
    ],
    ids=["lora_dropout_1", "lora_dropout_negative"],
)  # fmt: skip
def test_values_components_enforce_late(tmp_path, base, edits, expect):
    assert _error(_config(tmp_path, base, **edits)) == expect


def test_mixed_paired_and_unpaired_dataset_list(tmp_path, base):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_rows(8))
    part = {"source": "json", "data_files": str(data)}
    cfg = _config(
        tmp_path,
        base,
        dataset=[
            {"_component_": "torchtune_prefopt.data.preference_dataset", **part},
            {"_component_": "torchtune_prefopt.data.unpaired_from_paired", **part},
        ],
    )
    msg = _error(cfg)
    assert msg.startswith("dataset[1]: yields unpaired rows but dataset[0] yields paired ones"), msg


def _trains(cfg) -> List[dict]:
    run_in_process(cfg)
    out = Path(cfg.output_dir)
    assert (out / "final").is_symlink()
    return log_rows(out)


def test_torch_native_lr_scheduler_trains(tmp_path, base):
    sched = {
        "_component_": "torch.optim.lr_scheduler.LinearLR",
        "start_factor": 0.5,
        "total_iters": 2,
    }
    rows = _trains(_config(tmp_path, base, lr_scheduler=sched))
    lr = float(_config(tmp_path, base).optimizer.lr)
    # LinearLR: 0.5 * lr at step 1, then 0.75, 1.0 of it (the rate each step used)
    assert [r["lr"] for r in rows] == pytest.approx([0.5 * lr, 0.75 * lr])


def test_metric_logger_null_means_no_logger(tmp_path, base):
    cfg = _config(tmp_path, base, metric_logger=None)
    run_in_process(cfg)
    out = Path(cfg.output_dir)
    assert (out / "final").is_symlink() and not (out / "logs").exists()
    # the config is saved all the same (prefopt_compare reads a run's loss and model from it)
    assert OmegaConf.load(out / "torchtune_config.yaml") == cfg


def test_bf16_on_a_cpu_is_advised_against_not_changed(tmp_path, base, caplog):
    """``device=cpu dtype=bf16``: one warning advising fp32 (17-30x faster on a CPU); the run
    keeps the dtype it was given (the dtype is part of the model's numerics)."""
    import logging

    import torch

    from tune_harness import recipe_in_process

    cfg = _config(tmp_path, base, dtype="bf16", device="cpu")
    with caplog.at_level(logging.INFO), recipe_in_process(cfg) as recipe:
        assert next(recipe._model.parameters()).dtype == torch.bfloat16
    warnings = [r.getMessage() for r in caplog.records if "dtype bf16 on a CPU" in r.getMessage()]
    assert len(warnings) == 1 and "set dtype=fp32" in warnings[0], warnings


@pytest.mark.parametrize("kind", ["gzip", "plain"])
def test_compressed_data_file_is_read(tmp_path, base, kind):
    rows = synthetic_rows(8)
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path = tmp_path / ("train.jsonl.gz" if kind == "gzip" else "train.jsonl")
    path.write_bytes(gzip.compress(text) if kind == "gzip" else text)
    from torchtune_prefopt.data import preference_dataset
    from torchtune_prefopt.models.tiny import tiny_tokenizer

    ds = preference_dataset(tiny_tokenizer(max_seq_len=64), source="json", data_files=str(path))
    assert ds.stats["rows"] == 8 and len(ds) == 8
    if kind == "gzip":  # the same rows as the uncompressed file
        plain = tmp_path / "plain.jsonl"
        plain.write_bytes(text)
        ref = preference_dataset(
            tiny_tokenizer(max_seq_len=64), source="json", data_files=str(plain)
        )
        assert [ds[i] for i in range(8)] == [ref[i] for i in range(8)]


def test_zstd_data_file_is_named_not_misread(tmp_path):
    from torchtune_prefopt.data import preference_dataset
    from torchtune_prefopt.models.tiny import tiny_tokenizer

    path = tmp_path / "train.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 16)  # the zstd frame magic
    with pytest.raises(
        PrefOptUserError, match=rf"^{path}: zstd-compressed, which this reader does not decompress"
    ):
        preference_dataset(tiny_tokenizer(max_seq_len=64), source="json", data_files=str(path))


def test_prefopt_debug_zero_means_off(monkeypatch):
    for value, on in [
        ("", False),
        ("0", False),
        ("false", False),
        ("off", False),
        ("1", True),
        ("yes", True),
    ]:
        monkeypatch.setenv("PREFOPT_DEBUG", value)
        assert debug_enabled() is on, value
    monkeypatch.delenv("PREFOPT_DEBUG")
    assert debug_enabled() is False


# ----------------------------------------------------------------------------- one run per output_dir
_HOLD = """
import sys, time
from pathlib import Path
from torchtune_prefopt.training.run_lock import OutputDirLock
lock = OutputDirLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_second_run_refuses_while_the_first_holds_the_lock_and_a_dead_holder_is_taken_over(
    tmp_path, base
):
    cfg = _config(tmp_path, base)
    out = Path(cfg.output_dir)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        msg = _error(cfg)
        assert msg.startswith(
            f"output_dir {out} is in use by another run (host {socket.gethostname()}, pid {holder.pid}, started "
        )
        assert "wait for it to finish or use another output_dir" in msg
        assert not ckpt.list_checkpoints(out) and (out / LOCK_NAME).is_file()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is stale, the next run takes it over
    run_in_process(cfg)
    assert (out / "final").is_symlink() and not (out / LOCK_NAME).exists()


def test_lock_of_another_host_is_not_taken_and_a_reused_pid_is_stale(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock_file = out / LOCK_NAME
    lock_file.write_text(json.dumps({"host": "node-17", "pid": 4242, "started": "then"}))
    with pytest.raises(
        PrefOptUserError,
        match=rf"in use by another run \(host node-17, pid 4242, started then\): .*delete {lock_file}",
    ):
        OutputDirLock(out).acquire()
    # this host, a live pid (ours) but another process start time: the pid was reused
    lock_file.write_text(
        json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "process_start": "0"})
    )
    lock = OutputDirLock(out)
    lock.acquire()
    assert json.loads(lock_file.read_text())["token"] == lock.token
    lock.release()
    assert not lock_file.exists()


# ----------------------------------------------------------------------------- identity is content
def test_identity_follows_content_not_paths(tmp_path, base):
    cfg = _config(tmp_path, base, save_every_n_steps=1)
    run_in_process(cfg)
    out = Path(cfg.output_dir)
    first = ckpt.read_manifest(out / "final")["run"]["id"]

    # the same bytes staged elsewhere (data file and base weights): the same run resumes
    staged = tmp_path / "staged"
    staged.mkdir()
    data = Path(shutil.copy(cfg.dataset.data_files, staged / "train.jsonl"))
    weights = staged / "base"
    shutil.copytree(tmp_path / "base", weights)
    moved = OmegaConf.merge(cfg, {"resume_from_checkpoint": True, "dataset": {"data_files": str(data)}, "checkpointer": {"checkpoint_dir": str(weights)}})  # fmt: skip
    run_in_process(moved)
    assert ckpt.read_manifest(out / "final")["run"]["id"] == first

    def differs(msg: str) -> str:
        return msg.split("trained with other settings (", 1)[1].split(" differ from this config")[0]

    # a row appended to the same file: another run
    with open(data, "a") as fh:
        fh.write(json.dumps(synthetic_rows(9)[8]) + "\n")
    msg = _error(moved)
    assert f"belongs to run {first}" in msg and differs(msg) == "dataset (the dataset's rows)", msg
    shutil.copy(cfg.dataset.data_files, data)

    # other weights at the same path: another run
    from safetensors.torch import load_file, save_file

    sd = load_file(str(weights / "model.safetensors"))
    name = sorted(sd)[0]
    sd[name] = sd[name] + 1e-3
    save_file(sd, str(weights / "model.safetensors"), metadata={"format": "pt"})
    msg = _error(moved)
    assert differs(msg) == "checkpointer (the base weights)", msg


# ----------------------------------------------------------------------------- writes fail
def _tmpfs(path: Path, size: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    return path


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory, base) -> int:
    """The size of one tiny DPO step checkpoint (weights, recipe state with the optimizer
    state, config files): a periodic save's (a final save holds no optimizer state)."""
    d = tmp_path_factory.mktemp("size")
    cfg = _config(d, base, max_steps_per_epoch=1, save_every_n_steps=1)
    run_in_process(cfg)
    final = (Path(cfg.output_dir) / "final").resolve()
    state = torch.load(final / "recipe_state.pt", weights_only=True)
    assert "optimizer" in state
    return sum(f.stat().st_size for f in final.rglob("*") if f.is_file())


def test_output_dir_without_room_for_a_checkpoint_refuses_before_training(
    tmp_path, base, checkpoint_bytes
):
    disk = _tmpfs(tmp_path / "disk", checkpoint_bytes // 2)
    try:
        cfg = _config(tmp_path, base, output_dir=str(disk / "out"))
        msg = _error(cfg)
        assert msg.startswith(f"output_dir: {disk / 'out' / 'checkpoints'} has "), msg
        assert "MiB free, one checkpoint needs about" in msg
        assert not (disk / "out").exists()  # nothing left: no logs, no lock, no empty folder
    finally:
        _umount(disk)


def test_read_only_checkpoints_folder_refuses_before_training(tmp_path, base):
    cfg = _config(tmp_path, base)
    root = _tmpfs(Path(cfg.output_dir) / "checkpoints", 1 << 20)
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
        msg = _error(cfg)
        assert (
            msg
            == f"output_dir: {root} is not writable (Read-only file system): checkpoints could not be saved"
        )
    finally:
        _umount(root)


def test_disk_full_during_a_periodic_save_keeps_the_previous_checkpoint(
    tmp_path, base, checkpoint_bytes
):
    disk = _tmpfs(tmp_path / "disk", int(checkpoint_bytes * 1.6))
    try:
        cfg = _config(tmp_path, base, output_dir=str(disk / "out"), save_every_n_steps=1)
        with pytest.raises(SystemExit) as stop:
            run_in_process(cfg)
        assert stop.value.code == EXIT_WRITE_FAILED
        out = disk / "out"
        steps = ckpt.list_checkpoints(out)
        assert [p.name for p in steps] == ["step_000001"]
        ckpt.verify_checkpoint(steps[0])  # complete: every file's size and checksum
        assert not list((out / "checkpoints").glob(".tmp-*"))  # no half-written folder
        assert not (out / LOCK_NAME).exists()
        # the kept checkpoint resumes (copied to a disk with room)
        copy = tmp_path / "copy"
        shutil.copytree(out, copy, symlinks=True)
    finally:
        _umount(disk)
    resumed = OmegaConf.merge(cfg, {"output_dir": str(copy), "resume_from_checkpoint": True})
    run_in_process(resumed)
    assert [p.name for p in ckpt.list_checkpoints(copy)] == ["step_000001", "step_000002"]


def test_disk_full_message_through_the_cli(tmp_path, base, checkpoint_bytes):
    disk = _tmpfs(tmp_path / "disk", int(checkpoint_bytes * 1.6))
    try:
        _config(tmp_path, base)
        config = tiny_config(tmp_path, "dpo", rows=8, batch_size=4, epochs=1, save_every_n_steps=1, output_dir=str(disk / "out"))  # fmt: skip
        proc = subprocess.run([str(TUNE), *recipe_args(config)], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        _umount(disk)
    assert proc.returncode == EXIT_WRITE_FAILED, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert (
        "writing the step 2 checkpoint failed" in errors[0]
        and "No space left on device" in errors[0]
    )
    assert "step_000001 is intact: resume from it with resume_from_checkpoint=True" in errors[0]
    assert "Traceback" not in proc.stderr


def test_full_disk_under_the_metric_log_is_one_line_and_exit_4(tmp_path, base, capfd):
    logs = _tmpfs(tmp_path / "logs", 4096)
    try:
        cfg = _config(tmp_path, base, epochs=40, **{"metric_logger.log_dir": str(logs)})
        with pytest.raises(SystemExit) as stop:
            run_in_process(cfg)
    finally:
        _umount(logs)
    assert stop.value.code == EXIT_WRITE_FAILED
    errors = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "No space left on device" in errors[0], errors
    # the line fits the case: the checkpoints that exist, or that none does yet
    saved = sorted((Path(cfg.output_dir) / "checkpoints").glob("step_*"))
    if saved:
        assert errors[0].endswith(
            f"the checkpoints saved so far are intact (newest {saved[-1].name}: "
            "resume_from_checkpoint=True)"
        ), errors
    else:
        assert errors[0].endswith(
            "no checkpoint of this run was written yet: free some space and run it again"
        ), errors


def test_a_full_disk_before_the_start_writes_nothing(tmp_path, base, capfd):
    """output_dir on a disk that is already full: one line that fits the case (nothing was
    saved, nothing is claimed intact), and no file of the run (not even its lock) is left."""
    disk = _tmpfs(tmp_path / "disk", 64 * 1024)
    try:
        with open(disk / "filler", "wb") as f:  # fill the disk
            try:
                f.write(b"\0" * (1 << 20))
            except OSError:
                pass
        cfg = _config(tmp_path, base, output_dir=str(disk / "out"))
        message = ""
        try:
            run_in_process(cfg)
            raise AssertionError("the run on a full disk did not stop")
        except SystemExit as stop:  # a failed write: exit 4
            code = stop.code
        except PrefOptUserError as err:  # refused before training (no room): exit 2
            code, message = 2, f"error: {err}"
        left = sorted(str(p.relative_to(disk)) for p in disk.rglob("*") if p.name != "filler")
    finally:
        _umount(disk)
    errors = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error: ")]
    line = errors[0] if errors else message
    assert code in (2, EXIT_WRITE_FAILED) and line, (code, errors)
    assert "intact" not in line, line
    assert all(not name.startswith("out/") or name == "out" for name in left), left


# ----------------------------------------------------------------------------- signals, console
def test_second_sigterm_during_the_preemption_save_still_exits_0(tmp_path, base):
    _config(tmp_path, base)
    config = tiny_config(tmp_path, "dpo", rows=64, batch_size=2, epochs=4, save_every_n_steps=None)
    out = tmp_path / "out"
    proc = subprocess.Popen([str(TUNE), *recipe_args(config)], cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "logs").exists() and log_rows(out):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    steps = ckpt.list_checkpoints(out)
    assert steps and ckpt.read_manifest(steps[-1])["reason"] == "sigterm"
    ckpt.verify_checkpoint(steps[-1])
