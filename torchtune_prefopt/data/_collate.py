"""Collate functions: paired (chosen rows then rejected rows) and unpaired KTO (+ KL rows)."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from torchtune_prefopt.data._common import CROSS_ENTROPY_IGNORE_IDX, truncate_keep_completion


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def paired_collate(
    batch: List[Mapping[str, Any]],
    padding_idx: int = 0,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
) -> Dict[str, torch.Tensor]:
    """Right-pad a batch of paired items.

    Returns ``{"input_ids": [2B, S], "labels": [2B, S], "index": [B]}``: rows ``0..B-1``
    are the chosen sequences and rows ``B..2B-1`` the rejected ones, in batch order.
    """
    if not batch:
        raise ValueError("paired_collate got an empty batch")
    inputs = [b["chosen_input_ids"] for b in batch] + [b["rejected_input_ids"] for b in batch]
    labels = [b["chosen_labels"] for b in batch] + [b["rejected_labels"] for b in batch]
    return {
        "input_ids": _pad(inputs, padding_idx),
        "labels": _pad(labels, ignore_idx),
        "index": torch.tensor([int(b["index"]) for b in batch], dtype=torch.long),
    }


def kto_collate(
    batch: List[Mapping[str, Any]],
    padding_idx: int = 0,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
    max_seq_len: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """Right-pad a batch of unpaired KTO items and build the mismatched KL rows.

    Row ``i`` is ``prompt_i + completion_i`` (labels -100 on the prompt). KL row ``i`` is
    ``prompt_i + completion_{(i+1) mod B}``, truncated to ``max_seq_len`` like the dataset
    does (prompt tokens dropped from the left first, then the completion end).

    Returns ``{"input_ids", "labels": [B, S], "is_desirable": [B] bool, "kl_input_ids",
    "kl_labels": [B, S'], "index": [B]}``.

    Raises:
        ValueError: if ``B < 2`` (the KL estimate pairs each prompt with another row's
            completion).
    """
    if len(batch) < 2:
        raise ValueError(
            f"KTO needs per-rank batch_size >= 2 (the KL term pairs each prompt with another "
            f"row's completion), got a batch of {len(batch)}; raise batch_size or use "
            "drop_last=True"
        )
    n = len(batch)
    inputs, labels, kl_inputs, kl_labels = [], [], [], []
    for i, item in enumerate(batch):
        prompt = list(item["prompt_ids"])
        for completion, ids_out, labels_out in (
            (item["completion_ids"], inputs, labels),
            (batch[(i + 1) % n]["completion_ids"], kl_inputs, kl_labels),
        ):
            p, (c,), _, _ = truncate_keep_completion(prompt, [list(completion)], max_seq_len)
            ids_out.append(p + c)
            labels_out.append([ignore_idx] * len(p) + c)
    return {
        "input_ids": _pad(inputs, padding_idx),
        "labels": _pad(labels, ignore_idx),
        "is_desirable": torch.tensor([bool(b["label"]) for b in batch], dtype=torch.bool),
        "kl_input_ids": _pad(kl_inputs, padding_idx),
        "kl_labels": _pad(kl_labels, ignore_idx),
        "index": torch.tensor([int(b["index"]) for b in batch], dtype=torch.long),
    }
