"""The one wrapper around the recipe's HF checkpointers: torchtune's
``FullModelHFCheckpointer`` and our :class:`~torchtune_prefopt.models.hf.checkpointer.HFFolderCheckpointer`
(``hf_checkpointer``: any architecture ``models.hf`` builds, names mapped by one table).

torchtune 0.6.1 keeps what a recipe needs to know about a checkpoint in private attributes
(``_checkpoint_dir``, ``_checkpoint_paths``, ``_model_type``) and can only write to
``<_output_dir>/epoch_<n>``; it is torchtune's final release, so these will not change.
:class:`HFCheckpoint` reads them here, and only here, so that the recipe and the reference
code never touch them.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, List

import torch

from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.models.hf.checkpointer import HFFolderCheckpointer, hf_weight_files

__all__ = ["HFCheckpoint", "hf_weight_files"]


@contextlib.contextmanager
def _quiet_torchtune():
    """torchtune logs each file it writes under the scratch folder, paths that no longer exist
    once the files move up: the recipe logs the checkpoint folder itself instead."""
    logger = logging.getLogger("torchtune.utils._logging")  # torchtune.utils.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class HFCheckpoint:
    """A configured HF checkpointer (``checkpointer`` / ``ref_checkpointer``) and what the
    recipe needs from it.

    Args:
        checkpointer: the instantiated component.
        key: its config key, for error messages.
    """

    def __init__(self, checkpointer: Any, key: str):
        from torchtune import training

        self.folder = isinstance(checkpointer, HFFolderCheckpointer)
        if not self.folder and not isinstance(checkpointer, training.FullModelHFCheckpointer):
            raise PrefOptUserError(
                f"{key}: this recipe reads and writes Hugging Face checkpoints; use "
                "torchtune_prefopt.models.hf.hf_checkpointer (with model_dir) or "
                "torchtune.training.FullModelHFCheckpointer (or a function returning one)"
            )
        self.checkpointer, self.key = checkpointer, key

    @classmethod
    def from_config(cls, node: Any, key: str) -> "HFCheckpoint":
        from torchtune import config

        return cls(config.instantiate(node), key)

    @property
    def checkpoint_dir(self) -> Path:
        if self.folder:
            return self.checkpointer.checkpoint_dir
        return Path(self.checkpointer._checkpoint_dir)

    @property
    def model_type(self) -> str:
        """torchtune's ``model_type`` name (``"HF"`` for ``hf_checkpointer``)."""
        return "HF" if self.folder else self.checkpointer._model_type.name

    def content_files(self) -> List[Path]:
        """The files whose bytes are the weights: the weight files and ``config.json``."""
        ck = self.checkpointer
        paths = ck.checkpoint_paths if self.folder else ck._checkpoint_paths
        return [*paths, self.checkpoint_dir / "config.json"]

    def load(self) -> Dict[str, torch.Tensor]:
        """The full state dict in torchtune names; a missing, truncated or damaged file is one
        line naming the key and the file (torchtune raises ``ValueError('Unable to load
        checkpoint from <file>')`` with the real error as its cause)."""
        from torchtune import training

        try:
            return self.checkpointer.load_checkpoint()[training.MODEL_KEY]
        except (ValueError, OSError, RuntimeError) as err:
            cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
            raise PrefOptUserError(f"{self.key}: {' '.join(str(err).split())}{cause}") from err

    def reader(self, checkpoint_dir: Path, output_dir: Path) -> "HFCheckpoint":
        """A checkpointer of the same model type over another HF folder (a step checkpoint)."""
        from torchtune import training

        if self.folder:
            return HFCheckpoint(
                self.checkpointer.reader(checkpoint_dir, output_dir), str(checkpoint_dir)
            )
        return HFCheckpoint(
            training.FullModelHFCheckpointer(
                checkpoint_dir=str(checkpoint_dir),
                checkpoint_files=hf_weight_files(checkpoint_dir),
                model_type=self.model_type,
                output_dir=str(output_dir),
            ),
            str(checkpoint_dir),
        )

    def write(self, state_dict: Dict[str, Any], dest: Path, adapter_only: bool = False) -> None:
        """Write a torchtune checkpoint dict (MODEL_KEY, optional ADAPTER_KEY/ADAPTER_CONFIG)
        as HF files into ``dest``.

        torchtune 0.6.1 always writes to ``<checkpointer._output_dir>/epoch_<n>``: its output
        dir points at a scratch folder inside ``dest`` for the call and the files move up.
        """
        ck = self.checkpointer
        scratch = dest / ".hf_scratch"
        attr = "output_dir" if self.folder else "_output_dir"
        original_output_dir = getattr(ck, attr)
        setattr(ck, attr, scratch)
        try:
            with _quiet_torchtune():
                ck.save_checkpoint(
                    dict(state_dict),
                    epoch=0,
                    intermediate_checkpoint=False,
                    adapter_only=adapter_only,
                )
        finally:
            setattr(ck, attr, original_output_dir)
        written = scratch / "epoch_0"
        for f in written.iterdir():
            shutil.move(str(f), str(dest / f.name))
        shutil.rmtree(scratch, ignore_errors=True)
