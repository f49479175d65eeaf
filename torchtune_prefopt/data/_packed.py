"""The packed layout: a micro-batch's sequences side by side without padding, prompts shared.

The same ``2B`` token sequences as the padded layout (:func:`paired_sequences`,
:func:`kto_sequences`: same truncation, BOS/EOS and labels), laid out differently:

* **documents**: with ``share_prompt``, sequence ``i`` and sequence ``B + i`` (chosen and
  rejected of pair ``i``; KTO row ``i`` and its KL row) become one document
  ``[common prefix | rest of the first | rest of the second]``
  (:mod:`~torchtune_prefopt.modules.packed_attention` gives its attention rule); without it,
  or when a shared document would not fit a row, each sequence is its own document;
* **rows**: documents are placed first-fit-decreasing into rows of at most ``capacity``
  tokens (the model's ``max_seq_len``); every row is padded to the longest, rounded up to a
  multiple of ``multiple_of`` (so compiled code sees a bounded number of shapes);
* **what to score**: a :class:`~torchtune_prefopt.modules.TokenSelection` names, for each of
  the ``2B`` sequences (slots, in the padded layout's order: first sequences then second), the
  positions whose hidden state predicts each of its label tokens -- a shared prefix position
  may serve both sequences.

``batch.logps(model)`` therefore returns the same ``[2B]`` layout as the padded batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from torchtune_prefopt.data._batch import (
    BatchFields,
    TokenSequence,
    kl_completion_index,
    kto_sequences,
    paired_sequences,
)
from torchtune_prefopt.data._common import CROSS_ENTROPY_IGNORE_IDX, common_prefix

__all__ = ["PackedBatch", "PackingLayout", "pack_sequences"]


@dataclass(frozen=True)
class PackingLayout:
    """How to pack: ``share_prompt`` (one document per pair), ``capacity`` (tokens per row, at
    most the model's ``max_seq_len``), ``multiple_of`` (row length rounding)."""

    share_prompt: bool
    capacity: int
    multiple_of: int = 128

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.multiple_of < 1:
            raise ValueError(f"bad packing layout {self}")


class _Document:
    __slots__ = ("tokens", "positions", "branches", "scored", "shared")

    def __init__(self) -> None:
        self.tokens: List[int] = []
        self.positions: List[int] = []
        self.branches: List[int] = []
        self.scored: List[Tuple[int, int, int]] = []  # (slot, offset in document, target)
        self.shared = False

    def __len__(self) -> int:
        return len(self.tokens)


def _score(labels: Sequence[int], offset_of, slot: int, ignore: int) -> List[Tuple[int, int, int]]:
    # position t predicts labels[t + 1]
    return [
        (slot, offset_of(t), labels[t + 1])
        for t in range(len(labels) - 1)
        if labels[t + 1] != ignore
    ]


def _single(seq: TokenSequence, slot: int, ignore: int) -> _Document:
    tokens, labels = seq
    d = _Document()
    d.tokens = list(tokens)
    d.positions = list(range(len(tokens)))
    d.branches = [0] * len(tokens)
    d.scored = _score(labels, lambda t: t, slot, ignore)
    return d


def _shared(first: TokenSequence, second: TokenSequence, slots: Tuple[int, int], ignore: int):
    """One document ``[prefix | first's rest | second's rest]``, or ``None`` if nothing is
    shared."""
    (a, la), (b, lb) = first, second
    k = common_prefix(a, b)
    if k == 0:
        return None
    n, m = len(a), len(b)
    d = _Document()
    d.tokens = list(a) + list(b[k:])
    d.positions = list(range(n)) + list(range(k, m))
    d.branches = [0] * k + [1] * (n - k) + [2] * (m - k)
    d.scored = _score(la, lambda t: t, slots[0], ignore) + _score(
        lb, lambda t: t if t < k else n + t - k, slots[1], ignore
    )
    d.shared = n > k and m > k  # both branches non-empty: the tree mask matters
    return d


def _first_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Bins of document indices, each summing to at most ``capacity`` (stable for ties)."""
    rows: List[List[int]] = []
    fill: List[int] = []
    for j in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r in range(len(rows)):
            if fill[r] + lengths[j] <= capacity:
                rows[r].append(j)
                fill[r] += lengths[j]
                break
        else:
            rows.append([j])
            fill.append(lengths[j])
    return rows


def _place(docs: Sequence[_Document], layout: PackingLayout) -> Tuple[List[List[int]], int]:
    """Rows of documents and the common row length: among row lengths ``L`` (multiples of
    ``multiple_of``, at most ``capacity``), the first-fit-decreasing packing that computes the
    fewest positions ``rows * L`` (ties: the fewest rows)."""
    lengths = [len(d) for d in docs]
    m, cap = layout.multiple_of, layout.capacity
    total, longest = sum(lengths), max(lengths)
    best = None
    length = -(-longest // m) * m
    while True:
        length = min(length, cap)
        rows = _first_fit_decreasing(lengths, length)
        cost = (len(rows) * length, len(rows))
        if best is None or cost < best[0]:
            best = (cost, rows, length)
        # a longer row cannot do better once one row holds everything, or at the capacity
        if len(rows) == 1 or length >= cap or best[0][0] <= total:
            break
        length += m
    return best[1], best[2]


def pack_sequences(
    first: Sequence[TokenSequence],
    second: Sequence[TokenSequence],
    layout: PackingLayout,
    pad_id: int = 0,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
) -> dict:
    """Pack ``B`` first and ``B`` second sequences (slots ``0..B-1`` and ``B..2B-1``).

    Returns the tensor fields of :class:`PackedBatch` (all but the row bookkeeping).

    Raises:
        ValueError: a sequence longer than ``layout.capacity``, or a sequence with no label
            token (``empty completion: rows [i]``, as the padded layout says).
    """
    b = len(first)
    if len(second) != b or b == 0:
        raise ValueError(
            f"pack_sequences needs B >= 1 first and B second sequences, got {b}/{len(second)}"
        )
    docs: List[_Document] = []
    for i in range(b):
        for seq in (first[i], second[i]):
            if len(seq[0]) > layout.capacity:
                raise ValueError(
                    f"a sequence of {len(seq[0])} tokens does not fit the model's max_seq_len "
                    f"({layout.capacity})"
                )
        shared = (
            _shared(first[i], second[i], (i, b + i), ignore_idx) if layout.share_prompt else None
        )
        if shared is not None and len(shared) <= layout.capacity:
            docs.append(shared)
        else:
            docs.append(_single(first[i], i, ignore_idx))
            docs.append(_single(second[i], b + i, ignore_idx))

    rows, length = _place(docs, layout)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, length), pad_id, dtype=torch.long)
    input_pos = torch.zeros((n_rows, length), dtype=torch.long)
    doc_ids = torch.full((n_rows, length), -1, dtype=torch.long)
    branch = torch.zeros((n_rows, length), dtype=torch.long)
    spans = []
    per_slot: List[List[Tuple[int, int]]] = [[] for _ in range(2 * b)]
    doc_id = 0
    for r, members in enumerate(rows):
        start = 0
        for j in members:
            d = docs[j]
            end = start + len(d)
            input_ids[r, start:end] = torch.tensor(d.tokens, dtype=torch.long)
            input_pos[r, start:end] = torch.tensor(d.positions, dtype=torch.long)
            branch[r, start:end] = torch.tensor(d.branches, dtype=torch.long)
            doc_ids[r, start:end] = doc_id
            spans.append((r, start, end, int(d.shared)))
            for slot, offset, target in d.scored:
                per_slot[slot].append((r * length + start + offset, target))
            start = end
            doc_id += 1
    empty = [s for s in range(2 * b) if not per_slot[s]]
    if empty:
        raise ValueError(f"empty completion: rows {empty} have no label tokens")
    flat = [pt for slot in per_slot for pt in slot]
    return {
        "input_ids": input_ids,
        "input_pos": input_pos,
        "doc": doc_ids,
        "branch": branch,
        "spans": torch.tensor(spans, dtype=torch.long).reshape(-1, 4),
        "positions": torch.tensor([p for p, _ in flat], dtype=torch.long),
        "targets": torch.tensor([t for _, t in flat], dtype=torch.long),
        "slots": torch.cat(
            [torch.full((len(s),), k, dtype=torch.long) for k, s in enumerate(per_slot)]
        ),
        "num_tokens": torch.tensor([len(s) for s in per_slot], dtype=torch.long),
        "sequence_tokens": torch.tensor(
            [len(seq[0]) for seq in (*first, *second)], dtype=torch.long
        ),
    }


@dataclass
class PackedBatch(BatchFields):
    """``B`` pairs (or ``B`` KTO rows with their KL rows) in packed rows.

    Attributes:
        input_ids, input_pos: ``[R, L]`` tokens and their positions within their own sequence.
        doc, branch: ``[R, L]`` document id (``-1`` on padding) and branch of each position.
        spans: ``[n_docs, 4]`` ``(row, start, end, shared)`` of each document.
        positions, targets, slots: ``[N]`` the scored tokens
            (:class:`~torchtune_prefopt.modules.TokenSelection`).
        num_tokens: ``[2B]`` scored tokens per sequence (first sequences, then second).
        sequence_tokens: ``[2B]`` tokens per sequence (what the padded layout holds unpadded).
        index: ``[B]`` dataset positions of the pairs / rows.
        is_desirable: ``[B]`` bool (KTO; empty for pairs).
        kl_completion_index: ``[B]`` (KTO; empty for pairs) dataset position whose completion
            KL row ``k`` borrows.
    """

    input_ids: Tensor
    input_pos: Tensor
    doc: Tensor
    branch: Tensor
    spans: Tensor
    positions: Tensor
    targets: Tensor
    slots: Tensor
    num_tokens: Tensor
    sequence_tokens: Tensor
    index: Tensor
    is_desirable: Tensor
    kl_completion_index: Tensor

    @property
    def paired(self) -> bool:
        """Pairs (``is_desirable`` is empty) or KTO rows."""
        return self.is_desirable.numel() == 0

    def rows(self, lo: int, hi: int):  # noqa: D102 - packed rows are not batch rows
        raise TypeError("a PackedBatch is packed per rank: slice the items before packing")

    @classmethod
    def pack_pairs(
        cls, items: List[Mapping[str, Any]], layout: PackingLayout, pad_id: int = 0
    ) -> "PackedBatch":
        """Pack paired rows: slots ``0..B-1`` chosen, ``B..2B-1`` rejected."""
        chosen, rejected = paired_sequences(items)
        empty = torch.zeros(0, dtype=torch.long)
        return cls(
            **pack_sequences(chosen, rejected, layout, pad_id),
            index=torch.tensor([int(it["index"]) for it in items], dtype=torch.long),
            is_desirable=empty.bool(),
            kl_completion_index=empty,
        )

    @classmethod
    def pack_unpaired(
        cls,
        items: List[Mapping[str, Any]],
        lo: int,
        hi: int,
        layout: PackingLayout,
        pad_id: int = 0,
        max_seq_len: Optional[int] = None,
    ) -> "PackedBatch":
        """Pack rows ``lo..hi-1`` of a KTO *global* micro-batch (KL partners are taken over all
        of ``items``): slots ``0..B-1`` the rows, ``B..2B-1`` their KL rows."""
        rows, kl_rows = kto_sequences(items, max_seq_len)
        mine = items[lo:hi]
        return cls(
            **pack_sequences(rows[lo:hi], kl_rows[lo:hi], layout, pad_id),
            index=torch.tensor([int(it["index"]) for it in mine], dtype=torch.long),
            is_desirable=torch.tensor([bool(it["label"]) for it in mine], dtype=torch.bool),
            kl_completion_index=kl_completion_index(items)[lo:hi],
        )

    def selection(self):
        from torchtune_prefopt.modules import TokenSelection

        return TokenSelection(self.positions, self.targets, self.slots, self.num_tokens)

    def attention(self):
        """The batch's :class:`~torchtune_prefopt.modules.packed_attention.PackedAttention`."""
        from torchtune_prefopt.modules.packed_attention import PackedAttention

        return PackedAttention(self.doc, self.branch, self.spans, positions=self.input_pos)

    def logps(self, model, chunk_size: int = 1024):
        """``[2B]`` per-sequence log-probs (first sequences, then second), one forward over
        the packed rows. KTO's KL rows are scored in the same forward and come back detached,
        as from the padded layout."""
        from torchtune_prefopt.modules import decoder_sequence_logprobs
        from torchtune_prefopt.modules.packed_attention import enable_packed_attention

        enable_packed_attention(model)
        lp = decoder_sequence_logprobs(
            model,
            self.input_ids,
            selection=self.selection(),
            chunk_size=chunk_size,
            mask=self.attention(),
            input_pos=self.input_pos,
        )
        if self.paired:
            return lp
        rows, kl = lp.halves()
        return type(lp).cat(rows, kl.detach())

    def label_counts(self) -> Tensor:
        """``[2B]`` scored tokens per sequence."""
        return self.num_tokens

    def computed_tokens(self) -> int:
        """Positions the model runs over (row padding included)."""
        return int(self.input_ids.numel())

    def real_tokens(self) -> int:
        """Tokens of the ``2B`` sequences (a shared prompt counted for both: the same number
        in every layout)."""
        return int(self.sequence_tokens.sum())

    def token_weights(self) -> Tensor:
        """``[R * L]`` how many of the ``2B`` sequences each position holds: 2 on the shared
        prompt of a two-sequence document (branch 0 of a document that has a branch 1 or 2),
        1 on any other token, 0 on padding (as :meth:`PairedBatch.token_weights` counts the
        padded layout's positions)."""
        real = self.doc >= 0
        two = torch.zeros(int(self.spans.shape[0]), dtype=torch.bool, device=self.doc.device)
        two[self.doc[real & (self.branch > 0)]] = True
        prefix = real & (self.branch == 0) & two[self.doc.clamp(min=0)]
        return (real.float() + prefix.float()).reshape(-1)
