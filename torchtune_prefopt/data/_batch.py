"""Preference batches: the one owner of how rows become model inputs and how the per-sequence
log-probs of a batch map back to pairs and rows.

Two row kinds come out of the datasets (:func:`is_paired_row` tells them apart):

* paired rows (DPO, IPO, SimPO, ...): ``{"chosen_input_ids", "chosen_labels",
  "rejected_input_ids", "rejected_labels", "index"}``;
* unpaired rows (KTO): ``{"prompt_ids", "completion_ids", "label", "index"}``.

Batch layouts (right-padded, labels ``CROSS_ENTROPY_IGNORE_IDX`` (-100) on prompt and padding tokens):

* :class:`PairedBatch`: ``input_ids``/``labels`` ``[2B, S]``, **chosen sequences in rows
  ``0..B-1`` and rejected ones in rows ``B..2B-1``**, in batch order; :meth:`PairedBatch.chosen`
  / :meth:`PairedBatch.rejected` split anything laid out that way (a ``[2B]`` tensor, a
  :class:`~torchtune_prefopt.modules.SequenceLogProbs`).
* :class:`UnpairedBatch`: ``input_ids``/``labels`` ``[B, S]`` plus KTO's mismatched KL rows
  ``kl_input_ids``/``kl_labels`` ``[B, S']``. **KL row ``k`` is prompt ``k`` with the completion of
  row** :func:`kl_partner` ``(k, B) = (k + 1) mod B`` of the same *global* micro-batch.

:class:`PreferenceCollator` is the ``collate_fn`` of every DataLoader of the recipe (training,
evaluation): it takes the *global* micro-batch (every rank gets the same rows) and returns this
rank's part as a batch object.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import torch
from torch import Tensor

from torchtune_prefopt.data._common import CROSS_ENTROPY_IGNORE_IDX, truncate_keep_completion

__all__ = [
    "PairedBatch",
    "PreferenceBatch",
    "PreferenceCollator",
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
) -> Dict[str, Tensor]:
    """Right-pad a batch of unpaired KTO items and build the mismatched KL rows.

    Row ``i`` is ``prompt_i + completion_i`` (labels -100 on the prompt). KL row ``i`` is
    ``prompt_i + completion_{kl_partner(i, B)}``, truncated to ``max_seq_len`` like the dataset
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
            (batch[kl_partner(i, n)]["completion_ids"], kl_inputs, kl_labels),
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


# --------------------------------------------------------------------------- batches


def _logps(model, input_ids: Tensor, labels: Tensor, chunk_size: int):
    from torchtune_prefopt.modules import decoder_sequence_logprobs

    return decoder_sequence_logprobs(model, input_ids, labels, chunk_size=chunk_size)


def _label_counts(labels: Tensor) -> Tensor:
    """Scored tokens per row of *unshifted* labels (token ``t+1`` is predicted at ``t``)."""
    return (labels[:, 1:] != CROSS_ENTROPY_IGNORE_IDX).sum(dim=1)


class _Batch:
    """Tensor-field helpers shared by both layouts."""

    def to(self: T, device: Union[str, torch.device]) -> T:
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def rows(self: T, lo: int, hi: int) -> T:
        """Rows ``lo..hi-1`` of every field (used to take one rank's part of an unpaired
        global micro-batch; paired batches are sliced before collating)."""
        return type(self)(**{f.name: getattr(self, f.name)[lo:hi] for f in fields(self)})


@dataclass
class PairedBatch(_Batch):
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

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @staticmethod
    def chosen(x: T) -> T:
        """The chosen half of anything in this layout (``[2B]`` -> ``[B]``)."""
        return x[: len(x) // 2]

    @staticmethod
    def rejected(x: T) -> T:
        """The rejected half of anything in this layout (``[2B]`` -> ``[B]``)."""
        return x[len(x) // 2 :]

    @staticmethod
    def join(chosen: Tensor, rejected: Tensor) -> Tensor:
        """The inverse of :meth:`chosen` / :meth:`rejected`: ``[B] + [B] -> [2B]``."""
        return torch.cat([chosen, rejected])

    def logps(self, model, chunk_size: int = 1024):
        """Per-sequence log-probs of the ``2B`` completions (:class:`SequenceLogProbs`, this
        layout: split with :meth:`chosen` / :meth:`rejected`)."""
        return _logps(model, self.input_ids, self.labels, chunk_size)

    def label_counts(self) -> Tensor:
        """``[2B]`` scored tokens per sequence (this layout)."""
        return _label_counts(self.labels)

    def computed_tokens(self) -> int:
        """Positions the model runs over (padding included)."""
        return int(self.input_ids.numel())


@dataclass
class UnpairedBatch(_Batch):
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
        n = len(items)
        out = kto_collate(
            items, padding_idx=pad_id, ignore_idx=ignore_index, max_seq_len=max_seq_len
        )
        partners = [int(items[kl_partner(k, n)]["index"]) for k in range(n)]
        return cls(**out, kl_completion_index=torch.tensor(partners, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def logps(self, model, chunk_size: int = 1024):
        """``[B]`` per-sequence log-probs of the rows' completions."""
        return _logps(model, self.input_ids, self.labels, chunk_size)

    def kl_logps(self, model, chunk_size: int = 1024):
        """``[B]`` per-sequence log-probs of the KL rows' (borrowed) completions."""
        return _logps(model, self.kl_input_ids, self.kl_labels, chunk_size)

    def label_counts(self) -> Tensor:
        return _label_counts(self.labels)

    def kl_label_counts(self) -> Tensor:
        return _label_counts(self.kl_labels)

    def computed_tokens(self) -> int:
        return int(self.input_ids.numel() + self.kl_input_ids.numel())


PreferenceBatch = Union[PairedBatch, UnpairedBatch]


@dataclass
class PreferenceCollator:
    """``collate_fn`` over a *global* micro-batch: returns this rank's part as a batch.

    Paired: the rank's ``rows_per_rank`` pairs are cut out first, then collated. Unpaired
    (KTO): the whole global micro-batch is collated (KL partners are taken over the global
    micro-batch, so 1 and N processes build the same KL rows), then the rank's rows are kept.

    Args:
        paired: the row kind (see :func:`is_paired_row`).
        pad_id: the tokenizer's padding id.
        max_seq_len: truncation length of KTO's KL rows (the dataset's own ``max_seq_len``).
        rank, rows_per_rank: this rank's slice ``[rank * rows_per_rank, (rank + 1) *
            rows_per_rank)`` of the global micro-batch; ``rows_per_rank=None``: all of it.
        world_size: the number of ranks (:meth:`share` splits a batch evenly over them).
    """

    paired: bool
    pad_id: int
    max_seq_len: Optional[int] = None
    rank: int = 0
    rows_per_rank: Optional[int] = None
    world_size: int = 1

    def _span(self, n: int) -> tuple:
        if self.rows_per_rank is None:
            return 0, n
        return self.rank * self.rows_per_rank, (self.rank + 1) * self.rows_per_rank

    def __call__(self, items: List[Mapping[str, Any]]) -> PreferenceBatch:
        lo, hi = self._span(len(items))
        if self.paired:
            return PairedBatch.collate(list(items[lo:hi]), pad_id=self.pad_id)
        full = UnpairedBatch.collate(list(items), pad_id=self.pad_id, max_seq_len=self.max_seq_len)
        return full if (lo, hi) == (0, len(items)) else full.rows(lo, hi)

    def share(self, items: List[Mapping[str, Any]]) -> Tuple[PreferenceBatch, int]:
        """Paired evaluation over a global batch that may be the last, partial one: rank ``k``
        of ``world_size`` takes rows ``[k*n//W, (k+1)*n//W)`` (for a full batch, the same
        ``rows_per_rank`` slice as training), so every row is counted exactly once. Returns
        ``(batch, real_rows)``; a rank left without a row gets one copy of the first row
        (``real_rows == 0``), because every rank must run the same number of forwards."""
        if not self.paired:
            raise ValueError("share() is for paired (evaluation) batches")
        n, w = len(items), self.world_size
        mine = list(items[self.rank * n // w : (self.rank + 1) * n // w])
        real = len(mine)
        return PairedBatch.collate(mine or list(items[:1]), pad_id=self.pad_id), real
