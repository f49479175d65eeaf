"""Data order that does not depend on the number of processes.

Every rank draws the same *global* micro-batches (``batch_size * world_size`` dataset
indices per micro-step, from a permutation seeded by ``seed + epoch``) and keeps its own
contiguous slice (:class:`~torchtune_prefopt.data.PreferenceCollator` cuts it). So a run on 1
process and a run on N processes with the same global batch see the same examples at the same
step, KTO's in-batch mismatched pairs (built over the
global micro-batch) are identical, and resuming only needs the number of micro-batches
already consumed in the epoch.
"""

from __future__ import annotations

from typing import Iterator, List

import torch


class GlobalBatchSampler:
    """Yields, per micro-step, the global list of dataset indices (same on every rank).

    Args:
        dataset_len (int): number of rows.
        global_batch_size (int): ``batch_size * world_size`` rows per micro-step.
        seed (int): base seed; epoch ``e`` uses ``seed + e``.
        shuffle (bool): permute rows each epoch.
        drop_last (bool): drop the last incomplete global batch (training: every rank always
            gets exactly ``batch_size`` rows); ``False`` (evaluation): it is yielded too, so
            every row comes exactly once.
    """

    def __init__(
        self,
        dataset_len: int,
        global_batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if global_batch_size < 1:
            raise ValueError("global batch size must be >= 1")
        self.dataset_len = dataset_len
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation and skip ``start_batch`` micro-batches (resume)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        if self.drop_last:
            return self.dataset_len // self.global_batch_size
        return -(-self.dataset_len // self.global_batch_size)

    def epoch_order(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(self.dataset_len, generator=g).tolist()
        return list(range(self.dataset_len))

    def __iter__(self) -> Iterator[List[int]]:
        order = self.epoch_order()
        for b in range(self.start_batch, len(self)):
            yield order[b * self.global_batch_size : (b + 1) * self.global_batch_size]
