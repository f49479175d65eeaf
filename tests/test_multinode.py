"""Multi-node through torchrun's rendezvous: two torchrun agents ("nodes") on this machine.

Each agent is a real ``tune run --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d
--rdzv_endpoint 127.0.0.1:<port>`` launch, exactly what a user types on two hosts. The run must
give the same per-step losses as one process with the same global batch (the data order is a
global permutation cut into global micro-batches, so the process layout does not matter).
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tune_harness import TUNE, clean_env, log_rows, run_process

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out: Path) -> dict:
    return {row["step"]: row["loss"] for row in log_rows(out) if "loss" in row}


def _common(tmp_path: Path, out: Path) -> list:
    return [
        "prefopt_distributed",
        "--config",
        "tiny/dpo",
        f"output_dir={out}",
        f"checkpointer.checkpoint_dir={tmp_path / 'base'}",
        f"max_steps_per_epoch={STEPS}",
        "eval_dataset=null",
        "tokenizer.max_seq_len=64",
    ]


@pytest.mark.slow
def test_two_nodes_rendezvous_match_one_process(tmp_path):
    env = clean_env()
    single = tmp_path / "single"
    done = run_process([TUNE, "run", *_common(tmp_path, single), "batch_size=4"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    multi = tmp_path / "multi"
    port = _free_port()
    launch = [
        TUNE,
        "run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"127.0.0.1:{port}",
        "--rdzv_id",
        f"prefopt-{port}",
    ]
    nodes = [
        subprocess.Popen(
            [*launch, *_common(tmp_path, multi), "batch_size=2"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in nodes]
    for p, text in zip(nodes, outputs):
        assert p.returncode == 0, text[-3000:]
    assert any("2 process(es)" in text for text in outputs)

    one, two = _losses(single), _losses(multi)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step
    assert (multi / "final" / "config.json").is_file()
