"""The one wrapper around torchtune's ``FullModelHFCheckpointer``.

torchtune 0.6.1 keeps what a recipe needs to know about a checkpoint in private attributes
(``_checkpoint_dir``, ``_checkpoint_paths``, ``_model_type``) and can only write to
``<_output_dir>/epoch_<n>``; it is torchtune's final release, so these will not change.
:class:`HFCheckpoint` reads them here, and only here, so that the recipe and the reference
code never touch them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List

import torch

from torchtune_prefopt.errors import PrefOptUserError

__all__ = ["HFCheckpoint", "hf_weight_files"]


def hf_weight_files(path: Path) -> List[str]:
    """The model weight files of an HF checkpoint directory, sorted."""
    files = sorted(p.name for p in path.glob("*.safetensors") if not p.name.startswith("adapter"))
    if not files:
        files = sorted(
            p.name
            for p in path.glob("*.bin")
            if not p.name.startswith("adapter") and p.name != "training_args.bin"
        )
    return files


class HFCheckpoint:
    """A configured HF checkpointer (``checkpointer`` / ``ref_checkpointer``) and what the
    recipe needs from it.

    Args:
        checkpointer: the instantiated component.
        key: its config key, for error messages.
    """

    def __init__(self, checkpointer: Any, key: str):
        from torchtune import training

        if not isinstance(checkpointer, training.FullModelHFCheckpointer):
            raise PrefOptUserError(
                f"{key}: this recipe reads and writes Hugging Face checkpoints; use "
                "torchtune.training.FullModelHFCheckpointer (or a function returning one)"
            )
        self.checkpointer, self.key = checkpointer, key

    @classmethod
    def from_config(cls, node: Any, key: str) -> "HFCheckpoint":
        from torchtune import config

        return cls(config.instantiate(node), key)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpointer._checkpoint_dir)

    @property
    def model_type(self) -> str:
        return self.checkpointer._model_type.name

    def content_files(self) -> List[Path]:
        """The files whose bytes are the weights: the weight files and ``config.json``."""
        return [*self.checkpointer._checkpoint_paths, self.checkpoint_dir / "config.json"]

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
        original_output_dir = ck._output_dir
        ck._output_dir = scratch
        try:
            ck.save_checkpoint(
                dict(state_dict), epoch=0, intermediate_checkpoint=False, adapter_only=adapter_only
            )
        finally:
            ck._output_dir = original_output_dir
        written = scratch / "epoch_0"
        for f in written.iterdir():
            shutil.move(str(f), str(dest / f.name))
        shutil.rmtree(scratch, ignore_errors=True)
