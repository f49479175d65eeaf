"""Unpaired (KTO) data: one completion per row with a desirable/undesirable label."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

from torch.utils.data import Dataset

from torchtune_prefopt.data._common import resolve_max_seq_len, too_long_error, untruncated
from torchtune_prefopt.data._conversation import encode_completion, read_row, truncate_labelled
from torchtune_prefopt.data._paired import prepare_pairs
from torchtune_prefopt.data._source import RawRows, load_rows
from torchtune_prefopt.data._validation import label_value, resolve_column_map
from torchtune_prefopt.errors import PrefOptUserError

UNPAIRED_KEYS = ("prompt", "completion", "label", "tools")

# KTO paper (Ethayarajh et al., 2024), Eq. 8: keep lambda_D * n_D / (lambda_U * n_U) in [1, 4/3].
KTO_RATIO_RANGE = (1.0, 4.0 / 3.0)


class KTODataset(Dataset):
    """Pre-tokenized unpaired rows; see :func:`kto_dataset` / :func:`unpaired_from_paired`.

    Each item: ``{"prompt_ids", "completion_ids", "completion_labels", "label" (True =
    desirable), "index"}`` where ``prompt_ids + completion_ids`` is the chat-template
    tokenization of the prompt and the completion's trajectory (split at its first scored
    token) and ``completion_labels`` is ``completion_ids`` with -100 on the trajectory's
    unscored tokens (user/tool turns and role headers after its first assistant message).

    Attributes:
        stats (dict): rows, kept, n_desirable, n_undesirable, truncated_prompt,
            truncated_completion, max_seq_len, max_tokens (+ converter counts).
        source_rows (list[int]): item index -> row number in the source.
    """

    def __init__(
        self,
        examples: List[Tuple[int, List[int], List[int], List[int], bool]],
        counters: Dict[str, int],
        *,
        name: str,
        max_seq_len: Optional[int],
    ):
        items, source_rows = [], []
        truncated_prompt = truncated_completion = too_long = 0
        shortest = None
        for row, prompt, completion, completion_labels, label in examples:
            full = len(prompt) + len(completion)
            shortest = full if shortest is None else min(shortest, full)
            if max_seq_len is not None and full > max_seq_len:
                too_long += 1
            p, ((c, c_labels),), tp, tc = truncate_labelled(
                prompt, [(completion, completion_labels)], max_seq_len
            )
            truncated_prompt += tp
            truncated_completion += tc
            items.append(
                {
                    "prompt_ids": p,
                    "completion_ids": c,
                    "completion_labels": c_labels,
                    "label": bool(label),
                    "index": len(items),
                }
            )
            source_rows.append(row)
        if not items:
            raise PrefOptUserError(f"{name}: the dataset has no rows")
        if max_seq_len is not None and too_long == len(items):
            raise too_long_error(name, len(items), shortest, max_seq_len)
        n_desirable = sum(it["label"] for it in items)
        n_undesirable = len(items) - n_desirable
        if n_desirable == 0 or n_undesirable == 0:
            raise PrefOptUserError(
                f"{name}: KTO needs both desirable and undesirable rows, got "
                f"{n_desirable} desirable and {n_undesirable} undesirable"
            )
        self._items = items
        self.source_rows = source_rows
        self.name = name
        self.max_seq_len = max_seq_len
        self.stats = {
            **counters,
            "kept": len(items),
            "n_desirable": n_desirable,
            "n_undesirable": n_undesirable,
            "truncated_prompt": truncated_prompt,
            "truncated_completion": truncated_completion,
            "max_seq_len": max_seq_len,
            "max_tokens": max(len(it["prompt_ids"]) + len(it["completion_ids"]) for it in items),
        }

    @property
    def labels(self) -> List[bool]:
        return [it["label"] for it in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return dict(self._items[index])


def kto_dataset(
    tokenizer,
    *,
    source: str,
    column_map: Optional[Dict[str, str]] = None,
    new_system_prompt: Optional[str] = None,
    split: str = "train",
    max_seq_len: Optional[int] = None,
    **load_dataset_kwargs: Any,
) -> KTODataset:
    """Unpaired KTO dataset from rows ``(prompt, completion, label)``.

    ``prompt``: string or message list; ``completion``: non-empty string (or a message list
    ending in the assistant answer); ``label``: bool, True = desirable. ``column_map`` maps
    ``"prompt"``, ``"completion"``, ``"label"`` to column names. Loading, validation
    (one-line errors naming file, row, field), and truncation (prompt tokens dropped first,
    from the left; then the completion end) as in :func:`preference_dataset`. Raises
    ``ValueError`` if only one class is present.
    """
    raw = load_rows(source, split=split, **load_dataset_kwargs)
    max_len = resolve_max_seq_len(tokenizer, max_seq_len)
    return kto_from_raw(raw, tokenizer, column_map, new_system_prompt, max_len)


def kto_from_raw(
    raw: RawRows,
    tokenizer,
    column_map: Optional[Mapping[str, str]],
    new_system_prompt: Optional[str],
    max_seq_len: Optional[int],
) -> KTODataset:
    cmap = resolve_column_map(column_map, UNPAIRED_KEYS, "kto_dataset")
    if not raw.rows:
        raise PrefOptUserError(f"{raw.name}: the dataset has no rows")
    convs, labels = [], []
    for i, row in enumerate(raw.rows):  # validate every row before tokenizing any
        where = raw.where(i)
        convs.append(
            read_row(
                row,
                where,
                prompt_col=cmap["prompt"],
                completion_cols=(cmap["completion"],),
                tools_col=cmap["tools"],
            )
        )
        labels.append(label_value(row, cmap["label"], where))
    tok = untruncated(tokenizer)
    examples = []
    for i, conv in enumerate(convs):
        prompt, completion, completion_labels = encode_completion(
            tok, conv, new_system_prompt=new_system_prompt
        )
        examples.append((i, prompt, completion, completion_labels, labels[i]))
    return KTODataset(examples, {"rows": len(raw.rows)}, name=raw.name, max_seq_len=max_seq_len)


def unpaired_from_paired(
    tokenizer,
    *,
    source: str,
    column_map: Optional[Dict[str, str]] = None,
    new_system_prompt: Optional[str] = None,
    split: str = "train",
    max_seq_len: Optional[int] = None,
    **load_dataset_kwargs: Any,
) -> KTODataset:
    """KTO dataset from paired data: chosen -> desirable, rejected -> undesirable.

    Takes the same arguments and row formats as :func:`preference_dataset` (and validates
    the same way; identical chosen/rejected rows are dropped and counted). Items alternate
    desirable/undesirable and a desirable item's neighbours come from other prompts: item
    ``2k`` is pair ``k``'s chosen completion and item ``2k+1`` pair ``n-1-k``'s rejected one,
    so unshuffled batches are balanced and ``kto_collate``'s mismatched KL pairs rarely share
    a prompt. Each completion is truncated independently.
    """
    raw = load_rows(source, split=split, **load_dataset_kwargs)
    max_len = resolve_max_seq_len(tokenizer, max_seq_len)
    return unpaired_from_raw(raw, tokenizer, column_map, new_system_prompt, max_len)


def unpaired_from_raw(
    raw: RawRows,
    tokenizer,
    column_map: Optional[Mapping[str, str]],
    new_system_prompt: Optional[str],
    max_seq_len: Optional[int],
) -> KTODataset:
    records, counters = prepare_pairs(
        raw,
        tokenizer,
        column_map=column_map,
        new_system_prompt=new_system_prompt,
        what="unpaired_from_paired",
    )
    n = len(records)
    examples = []
    for k in range(n):
        good, bad = records[k], records[n - 1 - k]
        examples.append((good.row, good.prompt, good.chosen, good.chosen_labels, True))
        examples.append((bad.row, bad.prompt, bad.rejected, bad.rejected_labels, False))
    counters = {**counters, "pairs": n}
    return KTODataset(examples, counters, name=raw.name, max_seq_len=max_seq_len)


def kto_balance_warning(
    n_desirable: int,
    n_undesirable: int,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Optional[str]:
    """A message if ``λ_D·n_D / (λ_U·n_U)`` is outside the KTO paper's range [1, 4/3].

    Returns ``None`` when the ratio is inside the range (bounds included).
    """
    lo, hi = KTO_RATIO_RANGE
    if n_undesirable <= 0 or undesirable_weight <= 0:
        return (
            f"KTO class balance: n_undesirable={n_undesirable}, "
            f"undesirable_weight={undesirable_weight}; the undesirable term has no weight"
        )
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    tol = 1e-9
    if lo - tol <= ratio <= hi + tol:
        return None
    # desirable_weight values that bring the ratio back into [lo, hi]
    base = undesirable_weight * n_undesirable / max(n_desirable, 1)
    return (
        f"KTO class balance: desirable_weight*n_desirable / (undesirable_weight*n_undesirable) "
        f"= {desirable_weight:g}*{n_desirable} / ({undesirable_weight:g}*{n_undesirable}) "
        f"= {ratio:.3f}, outside the recommended [1, 4/3] (KTO paper); e.g. set "
        f"desirable_weight in [{lo * base:.3g}, {hi * base:.3g}]"
    )
