"""A plain transformers DPO loop on the packing benchmark's rows: the floor a user writes by hand.

Run by ``benchmarks/bench_packing.py`` as ``python _plain_dpo.py <config.json>`` (the same JSON
as ``_trl_dpo.py``). Per step: the step's pairs as one right-padded ``[2B, S]`` batch (chosen
rows then rejected), the HF model's full logits, ``log_softmax`` in fp32, the completion tokens'
log-probs summed per sequence, the reference model's the same under ``torch.no_grad``, DPO
(beta 0.1), ``backward``, ``torch.optim.AdamW`` (lr 1e-6), no clipping, no scheduler. Nothing
clever: no chunking, no packing, no prompt sharing; under torchrun, DDP with each rank its
``batch`` pairs of the step. Steps are stamped into the same JSONL clock
file as our recipe (``_bench_components.StepClockLogger``: ``t``, ``cpu``, ``rss``, ``hwm``,
``cuda_peak``; after ``hold_after_step`` it holds so the harness reads the peak RSS).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _bench_components import peer_clock, peer_rows  # noqa: E402


def _batch(items, pad_id: int, device):
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 off the completion), ``[2B, S]``."""
    seqs = [(it["chosen_input_ids"], it["chosen_labels"]) for it in items]
    seqs += [(it["rejected_input_ids"], it["rejected_labels"]) for it in items]
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (i, lab) in enumerate(seqs):
        ids[r, : len(i)] = torch.tensor(i)
        labels[r, : len(lab)] = torch.tensor(lab)
        mask[r, : len(i)] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def _sequence_logps(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    logps = torch.log_softmax(logits, dim=-1)
    token = torch.gather(logps, 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * (target != -100)).sum(-1)


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    from transformers import AutoModelForCausalLM

    device = torch.device(cfg["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg["dtype"]]
    rows = peer_rows(cfg)
    policy = AutoModelForCausalLM.from_pretrained(cfg["checkpoint_dir"], dtype=dtype).to(device)
    reference = AutoModelForCausalLM.from_pretrained(cfg["checkpoint_dir"], dtype=dtype).to(device)
    policy.train()
    reference.eval().requires_grad_(False)
    # several processes (torchrun): DDP, as a hand-written loop would; each rank its part of
    # the step's pairs (cfg["batch"] per rank)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        policy = torch.nn.parallel.DistributedDataParallel(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.0)
    clock = peer_clock(cfg) if rank == 0 else None
    batch, beta = cfg["batch"], 0.1
    if clock:
        clock.log_dict({"loss": float("nan")}, 0)  # the clock's start
    for step in range(1, cfg["steps"] + 1):
        first = ((step - 1) * world + rank) * batch
        items = [rows[i] for i in range(first, first + batch)]
        ids, mask, labels = _batch(items, 0, device)
        pol = _sequence_logps(policy, ids, mask, labels)
        with torch.no_grad():
            ref = _sequence_logps(reference, ids, mask, labels)
        ratio = (pol - ref).chunk(2)
        loss = -F.logsigmoid(beta * (ratio[0] - ratio[1])).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if clock:
            clock.log_dict({"loss": loss.item()}, step)  # holds after hold_after_step


if __name__ == "__main__":
    main()
