"""Dataset positions as row identities."""

from __future__ import annotations

from typing import Any, Dict

from torch.utils.data import Dataset


class PositionIndexed(Dataset):
    """Wraps a dataset so each item's ``index`` is its position in *this* dataset.

    torchtune's ``ConcatDataset`` keeps each part's own ``index`` (restarting at 0), so
    ``index`` would not identify a row of the concatenation; the recipe's data order, its
    error messages and the reference log-prob cache all key rows by position.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        item = dict(self.dataset[i])
        item["index"] = int(i)
        return item

    def __getattr__(self, name: str) -> Any:  # stats, labels, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
