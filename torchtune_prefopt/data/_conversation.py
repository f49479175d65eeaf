"""One row's conversations, tokenized: the owner of "what is scored" for every dataset.

A row holds a shared prefix and one trajectory per completion column (chosen / rejected,
KTO's completion, SFT's response), found by :func:`~torchtune_prefopt.data._validation.trajectories`.
:func:`read_row` validates a row once; :func:`encode_row` renders ``prefix + trajectory`` with the tokenizer's chat template
(``tools`` passed as ``apply_chat_template(..., tools=...)`` does) and labels the tokens of
every assistant message of the trajectory (:func:`~torchtune_prefopt.data._common.tokenize_conversation`).
:func:`split_shared_prompt` cuts a pair into one prompt and two labelled completions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

from torchtune_prefopt.data._common import (
    CROSS_ENTROPY_IGNORE_IDX,
    HF_TOKENIZER_HINT,
    common_prefix,
    tokenize_conversation,
    truncate_keep_completion,
)
from torchtune_prefopt.data._validation import row_error, trajectories


@dataclass
class Encoded:
    """One rendered conversation: ``ids``, ``labels`` (-100 where not scored) and
    ``n_prompt``, the index of its first scored token."""

    ids: List[int]
    labels: List[int]
    n_prompt: int


def row_tools(row: Mapping[str, Any], column: Optional[str], where: str) -> Optional[List[Any]]:
    """The row's function schemas (a list, or a JSON string of one), or ``None``."""
    if column is None or row.get(column) is None:
        return None
    value = row[column]
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except ValueError as e:
            raise row_error(where, column, f"is not a JSON list of function schemas: {e}") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, Mapping) for t in value):
        raise row_error(where, column, "must be a list of function schemas (dicts)")
    return [dict(t) for t in value] or None


def _with_system_prompt(
    messages: List[Dict[str, Any]], n_prefix: int, new_system_prompt: Optional[str]
) -> tuple:
    """Every system message replaced by ``new_system_prompt`` (first), as torchtune's
    ``ChosenRejectedToMessages`` does; the prefix length follows."""
    if new_system_prompt is None:
        return messages, n_prefix
    dropped = sum(m["role"] == "system" for m in messages[:n_prefix])
    kept = [m for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": new_system_prompt}] + kept, n_prefix - dropped + 1


@dataclass
class RowConversations:
    """One validated row (:func:`read_row`): the shared ``prefix`` messages (empty: the
    completions share none), one trajectory per completion ``column``, the row's ``tools``."""

    where: str
    prefix: List[Dict[str, Any]]
    continuations: List[List[Dict[str, Any]]]
    columns: Sequence[str]
    tools: Optional[List[Any]]
    tools_col: Optional[str]


def read_row(
    row: Mapping[str, Any],
    where: str,
    *,
    prompt_col: Optional[str],
    completion_cols: Sequence[str],
    tools_col: Optional[str] = "tools",
) -> RowConversations:
    """Validate a row once (one line naming the row and field on a bad one), before any
    tokenization: its trajectories (:func:`~torchtune_prefopt.data._validation.trajectories`)
    and, when they share a prefix, its ``tools``."""
    prefix, continuations = trajectories(row, prompt_col, completion_cols, where)
    tools = row_tools(row, tools_col, where) if prefix else None
    return RowConversations(where, prefix, continuations, tuple(completion_cols), tools, tools_col)


def encode_row(
    tokenizer,
    conv: RowConversations,
    *,
    new_system_prompt: Optional[str] = None,
    train_on_input: bool = False,
) -> Optional[List[Encoded]]:
    """One :class:`Encoded` per completion column, or ``None`` when the completions share no
    prefix (whole conversations that differ from their first message)."""
    if not conv.prefix:
        return None
    if conv.tools and not hasattr(tokenizer, "tokenize_prompt_completion"):
        raise row_error(
            conv.where,
            conv.tools_col,
            f"needs the model's own chat template to render function schemas, and "
            f"{type(tokenizer).__name__} has none; {HF_TOKENIZER_HINT}",
        )
    out = []
    for cont, col in zip(conv.continuations, conv.columns):
        messages, n_prefix = _with_system_prompt(
            conv.prefix + cont, len(conv.prefix), new_system_prompt
        )
        try:
            ids, labels, n_prompt = tokenize_conversation(
                tokenizer, messages, n_prefix, tools=conv.tools, train_on_input=train_on_input
            )
        except (RuntimeError, ValueError) as e:
            raise row_error(conv.where, col, f"cannot be tokenized: {e}") from None
        out.append(Encoded(ids, labels, n_prompt))
    return out


def encode_completion(
    tokenizer, conv: RowConversations, *, new_system_prompt: Optional[str] = None
) -> tuple:
    """``(prompt_ids, completion_ids, completion_labels)`` of a row with one completion (KTO,
    SFT): split at the first scored token."""
    (enc,) = encode_row(tokenizer, conv, new_system_prompt=new_system_prompt)
    k = enc.n_prompt
    return enc.ids[:k], enc.ids[k:], enc.labels[k:]


def split_shared_prompt(encoded: Sequence[Encoded]) -> tuple:
    """``(prompt, [(completion_ids, completion_labels), ...])``: the prompt is the longest
    common token prefix of the conversations, up to the first scored token of each."""
    k = min(e.n_prompt for e in encoded)
    for e in encoded[1:]:
        k = min(k, common_prefix(encoded[0].ids, e.ids))
    return encoded[0].ids[:k], [(e.ids[k:], e.labels[k:]) for e in encoded]


def truncate_labelled(
    prompt: List[int], completions: Sequence[tuple], max_seq_len: Optional[int]
) -> tuple:
    """:func:`~torchtune_prefopt.data._common.truncate_keep_completion` for labelled
    completions ``(ids, labels)``: labels are cut with their ids, and a completion cut inside
    an unscored turn loses that turn's unscored tail (nothing after it is scored, and every
    sequence ends with a scored token).

    Returns ``(prompt, [(ids, labels), ...], prompt_truncated, completion_truncated)``."""
    new_prompt, cut, tp, tc = truncate_keep_completion(
        prompt, [ids for ids, _ in completions], max_seq_len
    )
    out = []
    for ids, (_, labels) in zip(cut, completions):
        labels = list(labels[: len(ids)])
        n = len(ids)
        while n > 1 and labels[n - 1] == CROSS_ENTROPY_IGNORE_IDX:
            n -= 1
        out.append((list(ids[:n]), labels[:n]))
    return new_prompt, out, tp, tc
