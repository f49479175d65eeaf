"""Paired preference data (DPO / IPO / SimPO): chosen and rejected completions per prompt."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from torch.utils.data import Dataset
from torchtune.data import ChosenRejectedToMessages

from torchtune_prefopt.data._common import (
    CROSS_ENTROPY_IGNORE_IDX,
    tokenize_split,
    too_long_error,
    truncate_keep_completion,
    untruncated,
)
from torchtune_prefopt.data._source import RawRows
from torchtune_prefopt.data._validation import conversation, resolve_column_map, row_error
from torchtune_prefopt.errors import PrefOptUserError

PAIRED_KEYS = ("prompt", "chosen", "rejected")


@dataclass
class PairRecord:
    """One validated, tokenized (untruncated) pair."""

    row: int  # position in the raw rows
    prompt: List[int]
    chosen: List[int]
    rejected: List[int]


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

    Raises a one-line :class:`DataRowError` on the first bad row (before tokenizing any).
    Rows whose chosen and rejected completions are identical, or whose chosen and rejected
    prompts differ, are dropped with a warning and counted.
    """
    cmap = resolve_column_map(column_map, PAIRED_KEYS, what)
    if not raw.rows:
        raise PrefOptUserError(f"{raw.name}: the dataset has no rows")

    # 1) validate all rows (cheap) before any tokenization
    convs = []
    for i, row in enumerate(raw.rows):
        where = raw.where(i)
        chosen = conversation(row, cmap["prompt"], cmap["chosen"], where)
        rejected = conversation(row, cmap["prompt"], cmap["rejected"], where)
        convs.append((chosen, rejected))

    # 2) torchtune's message transform (system prompt override, masks), then tokenize
    to_messages = ChosenRejectedToMessages(
        train_on_input=train_on_input, new_system_prompt=new_system_prompt
    )
    tok = untruncated(tokenizer)
    records: List[PairRecord] = []
    identical: List[int] = []
    mismatch: List[int] = []
    for i, (chosen, rejected) in enumerate(convs):
        msgs = to_messages({"chosen": chosen, "rejected": rejected})
        for side in ("chosen", "rejected"):
            # The prompt is everything before the final assistant message.
            for m in msgs[side][:-1]:
                m.masked = not train_on_input
            msgs[side][-1].masked = False
        try:
            c_prompt, c_completion = tokenize_split(tok, msgs["chosen"])
            r_prompt, r_completion = tokenize_split(tok, msgs["rejected"])
        except (RuntimeError, ValueError) as e:
            raise row_error(raw.where(i), cmap["chosen"], f"cannot be tokenized: {e}") from None
        if c_prompt != r_prompt:
            mismatch.append(i)
            continue
        if c_completion == r_completion:
            identical.append(i)
            continue
        records.append(PairRecord(i, c_prompt, c_completion, r_completion))

    if identical:
        warnings.warn(
            f"{raw.name}: dropped {len(identical)} row(s) whose chosen and rejected "
            f"completions are identical (first: {raw.where(identical[0])})",
            UserWarning,
            stacklevel=3,
        )
    if mismatch:
        warnings.warn(
            f"{raw.name}: dropped {len(mismatch)} row(s) whose chosen and rejected prompts "
            f"differ (first: {raw.where(mismatch[0])})",
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
            prompt, (chosen, rejected), tp, tc = truncate_keep_completion(
                rec.prompt, [rec.chosen, rec.rejected], max_seq_len
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
                    "chosen_labels": prompt_labels + chosen,
                    "rejected_input_ids": prompt + rejected,
                    "rejected_labels": prompt_labels + rejected,
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
