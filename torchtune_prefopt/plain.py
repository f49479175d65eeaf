"""Config values as plain Python: the one converter used wherever a config node is hashed,
printed as a command line or passed to user code."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["to_plain"]


def to_plain(value: Any, resolve: bool = True) -> Any:
    """OmegaConf containers -> dicts/lists (interpolations resolved unless ``resolve=False``),
    recursively; ``torch.dtype``/``torch.device``/``Path`` -> ``str``; anything else as is."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=resolve)
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else str(k): to_plain(v, resolve) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v, resolve) for v in value]
    return value
