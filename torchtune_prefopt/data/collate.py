"""The ``collate_fn`` of every DataLoader of the recipe (training, evaluation, precompute):
the *global* micro-batch in (every rank gets the same rows), this rank's part out, in the
padded (:mod:`~torchtune_prefopt.data._batch`) or packed (:mod:`~torchtune_prefopt.data._packed`)
layout. The last step of the data flow: it imports both layouts, neither imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Tuple, Union

from torchtune_prefopt.data._batch import PairedBatch, UnpairedBatch
from torchtune_prefopt.data._packed import PackedBatch, PackingLayout

__all__ = ["PreferenceBatch", "PreferenceCollator"]

PreferenceBatch = Union[PairedBatch, UnpairedBatch, PackedBatch]


@dataclass
class PreferenceCollator:
    """``collate_fn`` over a *global* micro-batch: returns this rank's part as a batch.

    Paired: the rank's ``rows_per_rank`` pairs are cut out first, then laid out. Unpaired
    (KTO): the KL partners are taken over the whole global micro-batch (so 1 and N processes
    build the same KL rows), then the rank's rows are kept.

    Args:
        paired: the row kind (see :func:`is_paired_row`).
        pad_id: the tokenizer's padding id.
        max_seq_len: truncation length of KTO's KL rows (the dataset's own ``max_seq_len``).
        rank, rows_per_rank: this rank's slice ``[rank * rows_per_rank, (rank + 1) *
            rows_per_rank)`` of the global micro-batch; ``rows_per_rank=None``: all of it.
        world_size: the number of ranks (:meth:`share` splits a batch evenly over them).
        packing: ``None``: the padded layout (:class:`PairedBatch`, :class:`UnpairedBatch`);
            a :class:`~torchtune_prefopt.data.PackingLayout`: packed rows
            (:class:`~torchtune_prefopt.data.PackedBatch`).
    """

    paired: bool
    pad_id: int
    max_seq_len: Optional[int] = None
    rank: int = 0
    rows_per_rank: Optional[int] = None
    world_size: int = 1
    packing: Optional[PackingLayout] = None

    def _span(self, n: int) -> tuple:
        if self.rows_per_rank is None:
            return 0, n
        return self.rank * self.rows_per_rank, (self.rank + 1) * self.rows_per_rank

    def _paired(self, items: List[Mapping[str, Any]]) -> PreferenceBatch:
        if self.packing is None:
            return PairedBatch.collate(items, pad_id=self.pad_id)
        return PackedBatch.pack_pairs(items, self.packing, pad_id=self.pad_id)

    def __call__(self, items: List[Mapping[str, Any]]) -> PreferenceBatch:
        lo, hi = self._span(len(items))
        if self.paired:
            return self._paired(list(items[lo:hi]))
        if self.packing is None:
            full = UnpairedBatch.collate(
                list(items), pad_id=self.pad_id, max_seq_len=self.max_seq_len
            )
            return full if (lo, hi) == (0, len(items)) else full.rows(lo, hi)
        return PackedBatch.pack_unpaired(
            list(items), lo, hi, self.packing, pad_id=self.pad_id, max_seq_len=self.max_seq_len
        )

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
        return self._paired(mine or list(items[:1])), real
