"""Prompt/response rows for torchtune's SFT recipes, tokenized like the preference data.

torchtune 0.6.1's ``instruct_dataset`` leaves the Qwen2.5 chat template's final
``<|im_end|>`` without a label, so a model fine-tuned with it never learns to stop (measured
on the tiny model: every sampled answer runs to ``max_new_tokens``). :func:`sft_dataset`
splits prompt and completion with the same :func:`~torchtune_prefopt.data._common.tokenize_split`
as the preference data (the completion includes the template's end tokens), so an SFT model
and the preference runs that start from it score the same tokens.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from torch.utils.data import Dataset

from torchtune_prefopt.data._common import (
    CROSS_ENTROPY_IGNORE_IDX,
    resolve_max_seq_len,
    too_long_error,
    untruncated,
)
from torchtune_prefopt.data._conversation import encode_completion, read_row, truncate_labelled
from torchtune_prefopt.data._source import load_rows
from torchtune_prefopt.data._validation import resolve_column_map
from torchtune_prefopt.errors import PrefOptUserError

SFT_KEYS = ("prompt", "response", "tools")


class SFTDataset(Dataset):
    """Items ``{"tokens": prompt + response, "labels": [-100] * len(prompt) + response}``
    (labels unshifted, as torchtune's SFT recipes expect)."""

    def __init__(self, items: List[Dict[str, List[int]]], name: str):
        if not items:
            raise PrefOptUserError(f"{name}: no usable rows")
        self._items = items
        self.name = name

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        item = self._items[index]
        return {"tokens": list(item["tokens"]), "labels": list(item["labels"])}


def sft_dataset(
    tokenizer,
    *,
    source: str,
    column_map: Optional[Dict[str, str]] = None,
    new_system_prompt: Optional[str] = None,
    split: str = "train",
    max_seq_len: Optional[int] = None,
    **load_dataset_kwargs: Any,
) -> SFTDataset:
    """SFT rows ``(prompt, response)`` for torchtune's ``full_finetune_*`` recipes.

    ``prompt``: string or message list; ``response``: non-empty string (or a message list
    ending in the assistant answer); ``column_map`` maps ``"prompt"``, ``"response"`` to
    column names. Loading, validation (one-line errors naming file, row, field) and
    truncation (prompt tokens dropped first) as in
    :func:`~torchtune_prefopt.data.preference_dataset`.
    """
    raw = load_rows(source, split=split, **load_dataset_kwargs)
    max_len = resolve_max_seq_len(tokenizer, max_seq_len)
    cmap = resolve_column_map(column_map, SFT_KEYS, "sft_dataset")
    if not raw.rows:
        raise PrefOptUserError(f"{raw.name}: the dataset has no rows")
    tok = untruncated(tokenizer)
    items, too_long, shortest = [], 0, None
    for i, row in enumerate(raw.rows):
        conv = read_row(
            row,
            raw.where(i),
            prompt_col=cmap["prompt"],
            completion_cols=(cmap["response"],),
            tools_col=cmap["tools"],
        )
        prompt, response, labels = encode_completion(tok, conv, new_system_prompt=new_system_prompt)
        full = len(prompt) + len(response)
        shortest = full if shortest is None else min(shortest, full)
        too_long += max_len is not None and full > max_len
        prompt, ((response, labels),), _, _ = truncate_labelled(
            prompt, [(response, labels)], max_len
        )
        items.append(
            {
                "tokens": prompt + response,
                "labels": [CROSS_ENTROPY_IGNORE_IDX] * len(prompt) + labels,
            }
        )
    if max_len is not None and too_long == len(raw.rows):
        raise too_long_error(raw.name, len(raw.rows), shortest, max_len)
    return SFTDataset(items, raw.name)
