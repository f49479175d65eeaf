"""KTO's reference point z0 across ranks: a real 2-process gloo run.

Rank 0 holds 3 KL pairs and rank 1 holds 1, so the global mean of all 4 KL estimates differs
from the mean of the two per-rank means; only an all-reduce of the SUM and the COUNT gives
the former. The test launches this same file as the worker script through
``python -m torch.distributed.run --nproc_per_node 2``; each rank writes its results to a
JSON file that the test then checks against a hand computation.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

BETA = 0.1
DESIRABLE_WEIGHT = 1.0
UNDESIRABLE_WEIGHT = 2.0

# Per-rank inputs (summed log-probs). r = policy - reference; KL diff = policy_kl - ref_kl.
#   rank 0: r = (-5+6, -6+5, -4+4.5) = (1, -1, 0.5), labels (D, U, D)
#           KL diffs (-7+8, -8+10, -9+12) = (1, 2, 3)   -> local sum 6, count 3, mean 2
#   rank 1: r = (-3+3.5) = (0.5,), label (U,)
#           KL diff (-20+30) = (10,)                    -> local sum 10, count 1, mean 10
# Global z0 = (6 + 10) / (3 + 1) = 4.0; the (wrong) mean of per-rank means = (2+10)/2 = 6.
RANK_DATA = {
    0: dict(
        policy_logps=[-5.0, -6.0, -4.0],
        reference_logps=[-6.0, -5.0, -4.5],
        is_desirable=[True, False, True],
        policy_kl_logps=[-7.0, -8.0, -9.0],
        reference_kl_logps=[-8.0, -10.0, -12.0],
    ),
    1: dict(
        policy_logps=[-3.0],
        reference_logps=[-3.5],
        is_desirable=[False],
        policy_kl_logps=[-20.0],
        reference_kl_logps=[-30.0],
    ),
}
# Second call, negative global mean: rank 0 KL diffs (-1, -2, -3), rank 1 (+3).
#   global mean = (-6 + 3)/4 = -0.75 -> clamped z0 = 0
#   (a mean of per-rank means, (-2 + 3)/2 = 0.5, would wrongly give 0.5; rank 1 alone, 3)
NEGATIVE_KL = {
    0: dict(policy_kl_logps=[-8.0, -9.0, -10.0], reference_kl_logps=[-7.0, -7.0, -7.0]),
    1: dict(policy_kl_logps=[-4.0], reference_kl_logps=[-7.0]),
}


def _worker(out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from torchtune_prefopt.losses import KTOLoss

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == 2
    data = RANK_DATA[rank]
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    policy = as_tensor(data["policy_logps"]).requires_grad_()
    reference = as_tensor(data["reference_logps"])
    is_desirable = torch.tensor(data["is_desirable"])
    policy_kl = as_tensor(data["policy_kl_logps"]).requires_grad_()
    reference_kl = as_tensor(data["reference_kl_logps"])

    loss_fn = KTOLoss(
        beta=BETA, desirable_weight=DESIRABLE_WEIGHT, undesirable_weight=UNDESIRABLE_WEIGHT
    )
    losses, rewards, kl = loss_fn(policy, reference, is_desirable, policy_kl, reference_kl)
    losses.sum().backward()

    neg = NEGATIVE_KL[rank]
    losses_neg, _, kl_neg = loss_fn(
        policy.detach(),
        reference,
        is_desirable,
        as_tensor(neg["policy_kl_logps"]),
        as_tensor(neg["reference_kl_logps"]),
    )
    result = dict(
        rank=rank,
        losses=losses.tolist(),
        rewards=rewards.tolist(),
        kl=kl.item(),
        kl_shape=list(kl.shape),
        kl_requires_grad=kl.requires_grad,
        policy_kl_grad_is_none=policy_kl.grad is None,
        policy_grad=policy.grad.tolist(),
        losses_neg=losses_neg.tolist(),
        kl_neg=kl_neg.item(),
    )
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- test side
def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _expected_losses(rank: int, z0: float) -> list:
    # desirable: λ_D (1 - σ(β(r - z0))); undesirable: λ_U (1 - σ(β(z0 - r)))
    data = RANK_DATA[rank]
    out = []
    for p, ref, good in zip(data["policy_logps"], data["reference_logps"], data["is_desirable"]):
        r = p - ref
        if good:
            out.append(DESIRABLE_WEIGHT * (1.0 - _sigmoid(BETA * (r - z0))))
        else:
            out.append(UNDESIRABLE_WEIGHT * (1.0 - _sigmoid(BETA * (z0 - r))))
    return out


def _expected_policy_grad(rank: int, z0: float) -> list:
    # d/dr λ_D(1 - σ(β(r - z0))) = -λ_D β σ'(β(r - z0)); d/dr λ_U(1 - σ(β(z0 - r)))
    # = +λ_U β σ'(β(z0 - r)), σ'(x) = σ(x)(1 - σ(x)); z0 is a constant (detached).
    dsig = lambda x: _sigmoid(x) * (1.0 - _sigmoid(x))  # noqa: E731
    data = RANK_DATA[rank]
    out = []
    for p, ref, good in zip(data["policy_logps"], data["reference_logps"], data["is_desirable"]):
        r = p - ref
        if good:
            out.append(-DESIRABLE_WEIGHT * BETA * dsig(BETA * (r - z0)))
        else:
            out.append(UNDESIRABLE_WEIGHT * BETA * dsig(BETA * (z0 - r)))
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kto_z0_is_global_mean_across_ranks(tmp_path):
    import pytest

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(Path(__file__).resolve()), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr}"

    results = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    z0 = (1 + 2 + 3 + 10) / 4  # = 4.0, the global mean over all 4 KL pairs
    mean_of_means = ((1 + 2 + 3) / 3 + 10) / 2  # = 6.0, what a naive average would give
    assert z0 != mean_of_means
    for rank, res in results.items():
        assert res["kl"] == pytest.approx(z0, abs=1e-12)
        assert res["kl"] != pytest.approx(mean_of_means)
        assert res["kl_shape"] == [] and res["kl_requires_grad"] is False
        assert res["losses"] == pytest.approx(_expected_losses(rank, z0), abs=1e-12)
        r = [
            p - q
            for p, q in zip(RANK_DATA[rank]["policy_logps"], RANK_DATA[rank]["reference_logps"])
        ]
        assert res["rewards"] == pytest.approx([BETA * x for x in r], abs=1e-12)
        assert res["policy_grad"] == pytest.approx(_expected_policy_grad(rank, z0), abs=1e-12)
        assert res["policy_kl_grad_is_none"] is True
        # Negative global mean -> clamped to 0 on both ranks (not 0.5, not rank 1's 3).
        assert res["kl_neg"] == 0.0
        assert res["losses_neg"] == pytest.approx(_expected_losses(rank, 0.0), abs=1e-12)
    # Rank 0's local mean (2) and rank 1's (10) would each differ from z0: all-reduced.
    assert results[0]["kl"] == results[1]["kl"]


def test_a_step_without_undesirable_rows_logs_no_undesirable_metrics(tmp_path):
    """KTO: a step whose rows are all desirable has no ``logps/undesirable`` or
    ``rewards/undesirable`` (absent, not a fake 0.0); the next, all undesirable, has them and
    no desirable ones."""

    from tune_harness import run_recipe, step_metrics, synthetic_rows, tiny_config, write_jsonl

    rows = synthetic_rows(4)
    kto = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in rows[:2]]
    kto += [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in rows[2:]]
    data = write_jsonl(tmp_path / "kto_rows.jsonl", kto)
    config = tiny_config(
        tmp_path,
        "kto",
        **{
            "dataset._component_": "torchtune_prefopt.data.kto_dataset",
            "dataset.data_files": str(data),
            "shuffle": False,
            "batch_size": 2,
        },
    )
    proc = run_recipe(config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = step_metrics(tmp_path / "out")[0]
    assert sorted(steps) == [1, 2]
    assert {"logps/desirable", "rewards/desirable"} <= set(steps[1])
    assert not {"logps/undesirable", "rewards/undesirable"} & set(steps[1])
    assert {"logps/undesirable", "rewards/undesirable"} <= set(steps[2])
    assert not {"logps/desirable", "rewards/desirable"} & set(steps[2])
    assert steps[1]["logps/desirable"] < 0 and steps[2]["logps/undesirable"] < 0


if __name__ == "__main__":
    _worker(sys.argv[1])
