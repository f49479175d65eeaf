"""Preference batches: the one owner of how rows become model inputs and how the per-sequence
log-probs of a batch map back to pairs and rows.

Two row kinds come out of the datasets (:func:`is_paired_row` tells them apart):

* paired rows (DPO, IPO, SimPO, ...): ``{"chosen_input_ids", "chosen_labels",
  "rejected_input_ids", "rejected_labels", "index"}``;
* unpaired rows (KTO): ``{"prompt_ids", "completion_ids", "completion_labels", "label",
  "index"}`` (``completion_labels`` optional: -100 on a trajectory's unscored tokens).

Batch layouts (right-padded, labels ``CROSS_ENTROPY_IGNORE_IDX`` (-100) on prompt and padding tokens):

* :class:`PairedBatch`: ``input_ids``/``labels`` ``[2B, S]``, **chosen sequences in rows
  ``0..B-1`` and rejected ones in rows ``B..2B-1``**, in batch order; the batch's
  :class:`~torchtune_prefopt.modules.SequenceLogProbs` splits with ``halves()``.
* :class:`UnpairedBatch`: ``input_ids``/``labels`` ``[B, S]`` plus KTO's mismatched KL rows
  ``kl_input_ids``/``kl_labels`` ``[B, S']``. **KL row ``k`` is prompt ``k`` with the completion of
  row** :func:`kl_partner` ``(k, B) = (k + 1) mod B`` of the same *global* micro-batch.

The modules flow one way: rows -> sequences and padded batches (this module) -> packed batches
(:mod:`~torchtune_prefopt.data._packed`) -> :class:`~torchtune_prefopt.data.collate.PreferenceCollator`,
the ``collate_fn`` of every DataLoader of the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import (
    Any,
    ClassVar,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import torch
from torch import Tensor

from torchtune_prefopt.data._common import CROSS_ENTROPY_IGNORE_IDX
from torchtune_prefopt.data._conversation import truncate_labelled

__all__ = [
    "BatchFields",
    "PairedBatch",
    "UnpairedBatch",
    "is_paired_row",
    "kl_partner",
    "kto_collate",
    "paired_collate",
]

T = TypeVar("T")


# --------------------------------------------------------------------------- row kinds


def is_paired_row(item: Mapping[str, Any]) -> bool:
    """True for a paired row (``chosen_input_ids`` ...), False for an unpaired KTO row
    (``prompt_ids`` + ``completion_ids``).

    Raises:
        ValueError: for any other layout.
    """
    if "chosen_input_ids" in item:
        return True
    if "prompt_ids" in item and "completion_ids" in item:
        return False
    raise ValueError(
        f"unknown dataset row layout (keys {sorted(item)}): expected paired or KTO rows"
    )


def kl_partner(k: int, n: int) -> int:
    """KTO's KL pairing: row ``k`` of a micro-batch of ``n`` rows borrows the completion of row
    ``(k + 1) mod n`` (a prompt with a completion written for another prompt)."""
    return (k + 1) % n


# --------------------------------------------------------------------------- padding


def _pad(rows: Sequence[Sequence[int]], value: int) -> Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


#: one sequence: ``(token ids, unshifted labels)``, labels ``-100`` on the prompt
TokenSequence = Tuple[List[int], List[int]]


def paired_sequences(
    batch: Sequence[Mapping[str, Any]],
) -> Tuple[List[TokenSequence], List[TokenSequence]]:
    """The chosen and the rejected sequences of paired rows, in batch order."""
    chosen = [(list(b["chosen_input_ids"]), list(b["chosen_labels"])) for b in batch]
    rejected = [(list(b["rejected_input_ids"]), list(b["rejected_labels"])) for b in batch]
    return chosen, rejected


def kto_sequences(
    batch: Sequence[Mapping[str, Any]],
    max_seq_len: Optional[int] = None,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
) -> Tuple[List[TokenSequence], List[TokenSequence]]:
    """KTO's rows and mismatched KL rows of a *global* micro-batch of ``n`` unpaired rows.

    Row ``i`` is ``prompt_i + completion_i`` (labels -100 on the prompt); KL row ``i`` is
    ``prompt_i + completion_{kl_partner(i, n)}``, truncated to ``max_seq_len`` like the dataset
    does (prompt tokens dropped from the left first, then the completion end).

    Raises:
        ValueError: if ``n < 2`` (the KL estimate pairs each prompt with another row's
            completion).
    """
    if len(batch) < 2:
        raise ValueError(
            f"KTO needs per-rank batch_size >= 2 (the KL term pairs each prompt with another "
            f"row's completion), got a batch of {len(batch)}; raise batch_size or use "
            "drop_last=True"
        )
    n = len(batch)
    rows, kl_rows = [], []
    for i, item in enumerate(batch):
        prompt = list(item["prompt_ids"])
        for other, out in ((item, rows), (batch[kl_partner(i, n)], kl_rows)):
            p, ((c, labels),), _, _ = truncate_labelled(
                prompt, [(list(other["completion_ids"]), completion_labels(other))], max_seq_len
            )
            out.append((p + c, [ignore_idx] * len(p) + labels))
    return rows, kl_rows


def completion_labels(item: Mapping[str, Any]) -> List[int]:
    """An unpaired item's completion labels: ``completion_labels`` (-100 on a trajectory's
    unscored tokens), or all of ``completion_ids`` for an item built without them."""
    labels = item.get("completion_labels")
    return list(item["completion_ids"] if labels is None else labels)


def _padded(
    seqs: Sequence[TokenSequence], padding_idx: int, ignore_idx: int
) -> Tuple[Tensor, Tensor]:
    return _pad([t for t, _ in seqs], padding_idx), _pad([lab for _, lab in seqs], ignore_idx)


def paired_collate(
    batch: List[Mapping[str, Any]],
    padding_idx: int = 0,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
) -> Dict[str, Tensor]:
    """Right-pad a batch of paired items.

    Returns ``{"input_ids": [2B, S], "labels": [2B, S], "index": [B]}``: rows ``0..B-1``
    are the chosen sequences and rows ``B..2B-1`` the rejected ones, in batch order.
    """
    if not batch:
        raise ValueError("paired_collate got an empty batch")
    chosen, rejected = paired_sequences(batch)
    input_ids, labels = _padded(chosen + rejected, padding_idx, ignore_idx)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "index": torch.tensor([int(b["index"]) for b in batch], dtype=torch.long),
    }


def kto_collate(
    batch: List[Mapping[str, Any]],
    padding_idx: int = 0,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
    max_seq_len: Optional[int] = None,
) -> Dict[str, Tensor]:
    """Right-pad a batch of unpaired KTO items and their mismatched KL rows
    (:func:`kto_sequences`).

    Returns ``{"input_ids", "labels": [B, S], "is_desirable": [B] bool, "kl_input_ids",
    "kl_labels": [B, S'], "index": [B]}``.
    """
    rows, kl_rows = kto_sequences(batch, max_seq_len, ignore_idx)
    input_ids, labels = _padded(rows, padding_idx, ignore_idx)
    kl_input_ids, kl_labels = _padded(kl_rows, padding_idx, ignore_idx)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "is_desirable": torch.tensor([bool(b["label"]) for b in batch], dtype=torch.bool),
        "kl_input_ids": kl_input_ids,
        "kl_labels": kl_labels,
        "index": torch.tensor([int(b["index"]) for b in batch], dtype=torch.long),
    }


# --------------------------------------------------------------------------- batches


def _logps(model, input_ids: Tensor, labels: Tensor, chunk_size: int):
    from torchtune_prefopt.modules import decoder_sequence_logprobs

    return decoder_sequence_logprobs(model, input_ids, labels, chunk_size=chunk_size)


def _sequence_lengths(labels: Tensor) -> Tensor:
    """Tokens per row of right-padded *unshifted* labels: every sequence ends with a scored
    completion token, so its length is one past its last label."""
    idx = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    return (idx * (labels != CROSS_ENTROPY_IGNORE_IDX)).amax(dim=1) + 1


def _label_counts(labels: Tensor) -> Tensor:
    """Scored tokens per row of *unshifted* labels (token ``t+1`` is predicted at ``t``)."""
    return (labels[:, 1:] != CROSS_ENTROPY_IGNORE_IDX).sum(dim=1)


class BatchFields:
    """Tensor-field helpers shared by every layout.

    Every batch scores ``2B`` sequences and ``logps(model)`` returns them in one ``[2B]``
    layout: the *first* sequences (paired: chosen; KTO: the rows) then the *second* ones
    (paired: rejected; KTO: the KL rows), in batch order; split it with
    :meth:`SequenceLogProbs.halves <torchtune_prefopt.modules.SequenceLogProbs.halves>`. The
    gradient contract is the same in every layout: KTO's KL rows come back detached (its
    reference point is not trained through).
    """

    def to(self: T, device: Union[str, torch.device]) -> T:
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def rows(self: T, lo: int, hi: int) -> T:
        """Rows ``lo..hi-1`` of every field (used to take one rank's part of an unpaired
        global micro-batch; paired batches are sliced before collating)."""
        return type(self)(**{f.name: getattr(self, f.name)[lo:hi] for f in fields(self)})

    def __len__(self) -> int:
        return int(self.index.shape[0])


@dataclass
class PairedBatch(BatchFields):
    """``B`` preference pairs, padded.

    Attributes:
        input_ids: ``[2B, S]`` chosen sequences (rows ``0..B-1``) then rejected (``B..2B-1``).
        labels: ``[2B, S]`` unshifted labels, :data:`CROSS_ENTROPY_IGNORE_IDX` on prompt and padding.
        index: ``[B]`` dataset positions of the pairs.
    """

    input_ids: Tensor
    labels: Tensor
    index: Tensor

    paired: ClassVar[bool] = True

    @classmethod
    def collate(
        cls,
        items: List[Mapping[str, Any]],
        pad_id: int = 0,
        ignore_index: int = CROSS_ENTROPY_IGNORE_IDX,
    ) -> "PairedBatch":
        return cls(**paired_collate(items, padding_idx=pad_id, ignore_idx=ignore_index))

    def logps(self, model, chunk_size: int = 1024):
        """Per-sequence log-probs of the ``2B`` completions (:class:`SequenceLogProbs`, this
        layout: split with its ``halves()``)."""
        return _logps(model, self.input_ids, self.labels, chunk_size)

    def label_counts(self) -> Tensor:
        """``[2B]`` scored tokens per sequence (this layout)."""
        return _label_counts(self.labels)

    def computed_tokens(self) -> int:
        """Positions the model runs over (padding included)."""
        return int(self.input_ids.numel())

    def real_tokens(self) -> int:
        """Tokens of the ``2B`` sequences (no padding; the same in every layout)."""
        return int(_sequence_lengths(self.labels).sum())

    def token_weights(self) -> Tensor:
        """``[2B * S]`` how many of the ``2B`` sequences each position of the forward holds:
        1 on a token, 0 on padding (the router load-balancing term's weights)."""
        idx = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return (idx[None, :] < _sequence_lengths(self.labels)[:, None]).float().reshape(-1)


@dataclass
class UnpairedBatch(BatchFields):
    """``B`` unpaired KTO rows and their ``B`` mismatched KL rows, padded.

    Attributes:
        input_ids, labels: ``[B, S]`` prompt ``k`` + completion ``k``.
        is_desirable: ``[B]`` bool.
        kl_input_ids, kl_labels: ``[B, S']`` prompt ``k`` + the completion of row
            ``kl_partner(k, n)`` of the global micro-batch of ``n`` rows.
        index: ``[B]`` dataset positions of the rows.
        kl_completion_index: ``[B]`` dataset position whose completion KL row ``k`` borrows.
    """

    input_ids: Tensor
    labels: Tensor
    is_desirable: Tensor
    kl_input_ids: Tensor
    kl_labels: Tensor
    index: Tensor
    kl_completion_index: Tensor

    paired: ClassVar[bool] = False

    @classmethod
    def collate(
        cls,
        items: List[Mapping[str, Any]],
        pad_id: int = 0,
        ignore_index: int = CROSS_ENTROPY_IGNORE_IDX,
        max_seq_len: Optional[int] = None,
    ) -> "UnpairedBatch":
        out = kto_collate(
            items, padding_idx=pad_id, ignore_idx=ignore_index, max_seq_len=max_seq_len
        )
        return cls(**out, kl_completion_index=kl_completion_index(items))

    def logps(self, model, chunk_size: int = 1024, with_kl: bool = True):
        """``[2B]`` per-sequence log-probs: the rows' completions, then the KL rows' borrowed
        completions (scored under ``torch.no_grad``: KTO's reference point is not trained
        through). ``with_kl=False``: the ``[B]`` rows only."""
        rows = _logps(model, self.input_ids, self.labels, chunk_size)
        if not with_kl:
            return rows
        with torch.no_grad():
            kl = _logps(model, self.kl_input_ids, self.kl_labels, chunk_size)
        return type(rows).cat(rows, kl)

    def label_counts(self) -> Tensor:
        """``[2B]`` scored tokens per sequence (rows, then KL rows)."""
        return torch.cat([_label_counts(self.labels), _label_counts(self.kl_labels)])

    def computed_tokens(self) -> int:
        return int(self.input_ids.numel() + self.kl_input_ids.numel())

    def real_tokens(self) -> int:
        """Tokens of the ``B`` rows and ``B`` KL rows (no padding)."""
        return int(_sequence_lengths(self.labels).sum() + _sequence_lengths(self.kl_labels).sum())


def kl_completion_index(items: Sequence[Mapping[str, Any]]) -> Tensor:
    """``[n]`` dataset position of the completion each KL row of a global micro-batch borrows."""
    n = len(items)
    return torch.tensor([int(items[kl_partner(k, n)]["index"]) for k in range(n)], dtype=torch.long)
