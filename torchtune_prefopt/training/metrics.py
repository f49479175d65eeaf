"""Per-step training metrics: sums over micro-batches and ranks, each over its own count."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

from torchtune_prefopt.training.distributed import all_reduce_sum

__all__ = ["StepMetrics"]


class StepMetrics:
    """Accumulates one logging period's metric sums and counts, then averages them globally.

    Every metric is a sum over rows divided by a named count (``rows`` by default; KTO's
    ``rewards/desirable`` is divided by the ``desirable`` count, ...). :meth:`reduce` is a
    collective: one all-reduce of every sum and count together, so 1 and N processes give the
    same means.

    Example::

        m = StepMetrics(device)
        m.add("loss", losses.sum())               # per row
        m.add("rewards/desirable", r.sum(), per="desirable")
        m.count(rows=b, desirable=n_d, tokens=t)
        means, counts = m.reduce()                # {"loss": ..., "rewards/desirable": ...}
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self._sums: Dict[str, Tensor] = {}
        self._per: Dict[str, str] = {}
        self._counts: Dict[str, float] = {}

    def add(self, name: str, total: Tensor, per: str = "rows") -> None:
        """Add ``total`` (a sum over rows) to metric ``name``, averaged over count ``per``."""
        previous = self._per.setdefault(name, per)
        if previous != per:
            raise ValueError(f"metric {name!r} is averaged over {previous!r}, not {per!r}")
        value = total.detach().to(self.device, torch.float64)
        self._sums[name] = self._sums[name] + value if name in self._sums else value

    def count(self, **counts: float) -> None:
        """Add to named counts (``rows=...``, ``desirable=...``, ``tokens=...``)."""
        for key, n in counts.items():
            self._counts[key] = self._counts.get(key, 0.0) + float(n)

    def reduce(self) -> Tuple[Dict[str, float], Dict[str, float]]:
        """``(means, counts)`` over every rank: the metric means (``loss`` first, then the
        others by name; a metric whose count is 0 is left out) and the summed counts; resets
        the accumulator. Collective."""
        names = sorted(self._sums, key=lambda k: (k != "loss", k))
        count_names = sorted(self._counts)
        sums = [self._sums[k] for k in names]
        vec = torch.cat(
            [
                torch.stack(sums)
                if sums
                else torch.zeros(0, dtype=torch.float64, device=self.device),
                torch.tensor(
                    [self._counts[k] for k in count_names], dtype=torch.float64, device=self.device
                ),
            ]
        )
        all_reduce_sum(vec)
        values = vec.tolist()
        counts = dict(zip(count_names, values[len(names) :]))
        # a metric whose count is 0 this period (KTO's rewards/undesirable for a batch of
        # desirable rows only) is absent, not a fake 0.0
        means = {
            k: values[i] / counts[self._per[k]]
            for i, k in enumerate(names)
            if counts.get(self._per[k], 0.0) > 0
        }
        self.reset()
        return means, counts
