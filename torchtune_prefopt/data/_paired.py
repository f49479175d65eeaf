"""Paired preference data (DPO / IPO / SimPO): chosen and rejected completions per prompt."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from torch.utils.data import Dataset

from torchtune_prefopt.data._common import CROSS_ENTROPY_IGNORE_IDX, too_long_error, untruncated
from torchtune_prefopt.data._conversation import (
    encode_row,
    read_row,
    split_shared_prompt,
    truncate_labelled,
)
from torchtune_prefopt.data._source import RawRows
from torchtune_prefopt.data._validation import resolve_column_map
from torchtune_prefopt.errors import PrefOptUserError

PAIRED_KEYS = ("prompt", "chosen", "rejected", "tools")


@dataclass
class PairRecord:
    """One validated, tokenized (untruncated) pair: a shared prompt and two labelled
    trajectories (labels -100 on their unscored tokens: user/tool turns, role headers)."""

    row: int  # position in the raw rows
    prompt: List[int]
    chosen: List[int]
    rejected: List[int]
    chosen_labels: List[int]
    rejected_labels: List[int]


def prepare_pairs(
    raw: RawRows,
    tokenizer,
    *,
    column_map: Optional[Mapping[str, str]] = None,
    train_on_input: bool = False,
    new_system_prompt: Optional[str] = None,
    what: str = "preference_dataset",
) -> tuple:
    """Validate every row, then tokenize. Returns ``(records, counters)``.

    Each completion is a trajectory after the shared prefix (``_validation.trajectories``);
    every assistant message in it is scored. Raises a one-line :class:`DataRowError` on the
    first bad row (before tokenizing any). Rows whose chosen and rejected completions are
    identical, or whose whole conversations share no prefix, are dropped with a warning and
    counted.
    """
    cmap = resolve_column_map(column_map, PAIRED_KEYS, what)
    if not raw.rows:
        raise PrefOptUserError(f"{raw.name}: the dataset has no rows")
    cols = (cmap["chosen"], cmap["rejected"])

    # 1) validate all rows (cheap) before any tokenization
    convs = [
        read_row(
            row,
            raw.where(i),
            prompt_col=cmap["prompt"],
            completion_cols=cols,
            tools_col=cmap["tools"],
        )
        for i, row in enumerate(raw.rows)
    ]

    # 2) render and tokenize
    tok = untruncated(tokenizer)
    records: List[PairRecord] = []
    identical: List[int] = []
    mismatch: List[int] = []
    for i, conv in enumerate(convs):
        encoded = encode_row(
            tok, conv, new_system_prompt=new_system_prompt, train_on_input=train_on_input
        )
        if encoded is None:
            mismatch.append(i)
            continue
        if encoded[0].ids == encoded[1].ids:
            identical.append(i)
            continue
        prompt, ((chosen, chosen_labels), (rejected, rejected_labels)) = split_shared_prompt(
            encoded
        )
        records.append(PairRecord(i, prompt, chosen, rejected, chosen_labels, rejected_labels))

    if identical:
        warnings.warn(
            f"{raw.name}: dropped {len(identical)} row(s) whose chosen and rejected "
            f"completions are identical (first: {raw.where(identical[0])})",
            UserWarning,
            stacklevel=3,
        )
    if mismatch:
        warnings.warn(
            f"{raw.name}: dropped {len(mismatch)} row(s) whose chosen and rejected "
            f"conversations differ from their first message, so no prompt is shared "
            f"(first: {raw.where(mismatch[0])})",
            UserWarning,
            stacklevel=3,
        )
    if not records:
        raise PrefOptUserError(
            f"{raw.name}: no usable rows ({len(identical)} identical chosen/rejected, "
            f"{len(mismatch)} with differing prompts, of {len(raw.rows)})"
        )
    counters = {
        "rows": len(raw.rows),
        "dropped_identical": len(identical),
        "dropped_prompt_mismatch": len(mismatch),
    }
    return records, counters


class PreferenceDataset(Dataset):
    """Pre-tokenized paired rows; see :func:`preference_dataset`.

    Attributes:
        stats (dict): counts for logging (rows, kept, dropped_*, truncated_*, max_seq_len,
            max_tokens).
        source_rows (list[int]): item index -> row number in the source.
    """

    def __init__(
        self,
        records: List[PairRecord],
        counters: Dict[str, int],
        *,
        name: str,
        max_seq_len: Optional[int],
        train_on_input: bool = False,
    ):
        items, source_rows = [], []
        truncated_prompt = truncated_completion = identical_after = 0
        too_long, shortest = 0, None
        for rec in records:
            full = len(rec.prompt) + max(len(rec.chosen), len(rec.rejected))
            shortest = full if shortest is None else min(shortest, full)
            if max_seq_len is not None and full > max_seq_len:
                too_long += 1
            prompt, ((chosen, c_labels), (rejected, r_labels)), tp, tc = truncate_labelled(
                rec.prompt,
                [(rec.chosen, rec.chosen_labels), (rec.rejected, rec.rejected_labels)],
                max_seq_len,
            )
            if chosen == rejected:  # only the truncated tails differed
                identical_after += 1
                continue
            truncated_prompt += tp
            truncated_completion += tc
            prompt_labels = (
                list(prompt) if train_on_input else [CROSS_ENTROPY_IGNORE_IDX] * len(prompt)
            )
            items.append(
                {
                    "chosen_input_ids": prompt + chosen,
                    "chosen_labels": prompt_labels + c_labels,
                    "rejected_input_ids": prompt + rejected,
                    "rejected_labels": prompt_labels + r_labels,
                    "index": len(items),
                }
            )
            source_rows.append(rec.row)
        if max_seq_len is not None and too_long == len(records):
            raise too_long_error(name, len(records), shortest, max_seq_len)
        if identical_after:
            warnings.warn(
                f"{name}: dropped {identical_after} row(s) whose chosen and rejected "
                f"completions are identical after truncation to max_seq_len={max_seq_len}",
                UserWarning,
                stacklevel=3,
            )
        if not items:
            raise PrefOptUserError(f"{name}: no usable rows after truncation")
        self._items = items
        self.source_rows = source_rows
        self.name = name
        self.max_seq_len = max_seq_len
        self.stats = {
            **counters,
            "kept": len(items),
            "dropped_identical_after_truncation": identical_after,
            "truncated_prompt": truncated_prompt,
            "truncated_completion": truncated_completion,
            "max_seq_len": max_seq_len,
            "max_tokens": max(
                max(len(it["chosen_input_ids"]), len(it["rejected_input_ids"])) for it in items
            ),
        }

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return dict(self._items[index])
