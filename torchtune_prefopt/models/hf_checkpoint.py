"""The one owner of weight reads and writes: every HF checkpoint the recipes touch (the base,
the reference, a step checkpoint on resume, a finished run's ``final/`` that the comparison
evaluates, the controlled task's SFT start) is read and written through :class:`HFCheckpoint`.

Two kinds of checkpointer exist, each wrapped by one small class with the same interface:

* :class:`FolderCheckpoint`: our :class:`~torchtune_prefopt.models.hf.checkpointer.HFFolderCheckpointer`
  (``hf_checkpointer``: any architecture ``models.hf`` builds, names mapped by one table);
* :class:`TorchtuneCheckpoint`: torchtune's ``FullModelHFCheckpointer`` (torchtune's model
  builders, names mapped by its per-``model_type`` code).

torchtune 0.6.1 keeps what a recipe needs to know about a checkpoint in private attributes
(``_checkpoint_dir``, ``_checkpoint_paths``, ``_model_type``, ``_output_dir``) and can only
write to ``<output_dir>/epoch_<n>``; it is torchtune's final release, so these will not
change. :class:`TorchtuneCheckpoint` reads them here, and only here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.models.hf.checkpointer import HFFolderCheckpointer, hf_weight_files

__all__ = ["FolderCheckpoint", "HFCheckpoint", "TorchtuneCheckpoint", "hf_weight_files"]


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


def _model_key() -> str:
    from torchtune import training

    return training.MODEL_KEY


def _user_permissions(folder: Path) -> None:
    """Give the files of a written checkpoint the user's umask (torchtune writes some weight
    files 0600, as a temporary file would be: another user of a shared model folder could
    not read them)."""
    mask = os.umask(0)
    os.umask(mask)
    for f in folder.iterdir():
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~mask)


def _config_says_dtype(config: Path, state_dict: Optional[Dict[str, Any]]) -> None:
    """An exported ``config.json`` names the dtype of the weights it sits next to
    (``from_pretrained`` loads the weights in the config's ``dtype`` / ``torch_dtype``: a
    bf16 input trained in fp32 would otherwise load its fp32 weights as bf16). The file is
    rewritten only where it says another dtype (an unchanged dtype keeps its bytes)."""
    floats = [
        t.dtype
        for t in (state_dict or {}).values()
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    if not config.is_file() or not floats:
        return
    name = str(max(set(floats), key=floats.count)).replace("torch.", "")
    data = json.loads(config.read_text())
    keys = [k for k in ("dtype", "torch_dtype") if k in data]
    if not keys and name == "float32":
        return  # no dtype said: transformers loads float32, what the weights are
    keys = keys or ["dtype"]
    if all(data.get(k) == name for k in keys):
        return
    for k in keys:
        data[k] = name
    config.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


class HFCheckpoint:
    """A configured HF checkpointer (``checkpointer`` / ``ref_checkpointer``) and what the
    recipes need from it: :meth:`load`, :meth:`write`, :meth:`reader` (the same kind over
    another folder), :meth:`content_files` (what a run's identity hashes).

    Build one with :meth:`of` (an instantiated checkpointer) or :meth:`from_config` (its
    config node); the subclass is chosen by the checkpointer's type.
    """

    def __init__(self, checkpointer: Any, key: str):
        self.checkpointer, self.key = checkpointer, key

    @staticmethod
    def of(checkpointer: Any, key: str) -> "HFCheckpoint":
        """The wrapper of an instantiated checkpointer; anything else is one line naming
        ``key``."""
        from torchtune import training

        if isinstance(checkpointer, HFFolderCheckpointer):
            return FolderCheckpoint(checkpointer, key)
        if isinstance(checkpointer, training.FullModelHFCheckpointer):
            return TorchtuneCheckpoint(checkpointer, key)
        raise PrefOptUserError(
            f"{key}: this recipe reads and writes Hugging Face checkpoints; use "
            "torchtune_prefopt.models.hf.hf_checkpointer (with model_dir) or "
            "torchtune.training.FullModelHFCheckpointer (or a function returning one)"
        )

    @staticmethod
    def from_config(node: Any, key: str) -> "HFCheckpoint":
        from torchtune import config

        return HFCheckpoint.of(config.instantiate(node), key)

    # ------------------------------------------------------------------ per kind
    @property
    def checkpoint_dir(self) -> Path:
        raise NotImplementedError

    def _weight_paths(self) -> List[Path]:
        raise NotImplementedError

    def reader(self, checkpoint_dir: Path, output_dir: Path) -> "HFCheckpoint":
        """A checkpointer of the same kind (and model type) over another HF folder: a step
        checkpoint, a finished run's ``final/``."""
        raise NotImplementedError

    def _output_dir_attr(self) -> str:
        raise NotImplementedError

    def weight_name(self, tune_name: str) -> str:
        """The name the user's files give the parameter ``tune_name`` (messages speak the
        user's names)."""
        return tune_name

    # ------------------------------------------------------------------ shared
    def content_files(self) -> List[Path]:
        """The files whose bytes are the weights: the weight files and ``config.json``."""
        return [*self._weight_paths(), self.checkpoint_dir / "config.json"]

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

    def write(self, state_dict: Dict[str, Any], dest: Path, adapter_only: bool = False) -> None:
        """Write a torchtune checkpoint dict (MODEL_KEY, optional ADAPTER_KEY/ADAPTER_CONFIG)
        as HF files into ``dest``.

        Both checkpointers write to ``<output_dir>/epoch_<n>``: their output dir points at a
        scratch folder inside ``dest`` for the call and the files move up.
        """
        ck, attr = self.checkpointer, self._output_dir_attr()
        scratch = dest / ".hf_scratch"
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
        _user_permissions(dest)
        if not adapter_only:
            _config_says_dtype(dest / "config.json", state_dict.get(_model_key()))


class FolderCheckpoint(HFCheckpoint):
    """``models.hf.hf_checkpointer``: an HF folder of any architecture ``models.hf`` builds."""

    @property
    def checkpoint_dir(self) -> Path:
        return self.checkpointer.checkpoint_dir

    def _weight_paths(self) -> List[Path]:
        return list(self.checkpointer.checkpoint_paths)

    def _output_dir_attr(self) -> str:
        return "output_dir"

    def weight_name(self, tune_name: str) -> str:
        from torchtune_prefopt.models.hf.weights import hf_name

        return hf_name(tune_name, self.checkpointer.family)

    def reader(self, checkpoint_dir: Path, output_dir: Path) -> HFCheckpoint:
        return FolderCheckpoint(
            self.checkpointer.reader(checkpoint_dir, output_dir), str(checkpoint_dir)
        )


class TorchtuneCheckpoint(HFCheckpoint):
    """torchtune's ``FullModelHFCheckpointer`` (a torchtune ``model_type``)."""

    @staticmethod
    def over(checkpoint_dir: Path, model_type: str, output_dir: Path) -> "TorchtuneCheckpoint":
        """torchtune's checkpointer over every weight file of ``checkpoint_dir``."""
        from torchtune import training

        checkpoint_dir = Path(checkpoint_dir).resolve()
        files = hf_weight_files(checkpoint_dir)
        if not files:
            raise PrefOptUserError(f"{checkpoint_dir}: no *.safetensors or *.bin weight files")
        return TorchtuneCheckpoint(
            training.FullModelHFCheckpointer(
                checkpoint_dir=str(checkpoint_dir),
                checkpoint_files=files,
                model_type=model_type,
                output_dir=str(output_dir),
            ),
            str(checkpoint_dir),
        )

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpointer._checkpoint_dir)

    @property
    def model_type(self) -> str:
        """torchtune's ``model_type`` name (``QWEN2``, ``LLAMA3``...)."""
        return self.checkpointer._model_type.name

    def _weight_paths(self) -> List[Path]:
        return list(self.checkpointer._checkpoint_paths)

    def _output_dir_attr(self) -> str:
        return "_output_dir"

    def reader(self, checkpoint_dir: Path, output_dir: Path) -> HFCheckpoint:
        return TorchtuneCheckpoint.over(checkpoint_dir, self.model_type, output_dir)

    def weight_name(self, tune_name: str) -> str:
        """torchtune's own HF name table (``convert_weights._FROM_HF``), inverted."""
        from torchtune.models import convert_weights

        inverted = {v: k for k, v in convert_weights._FROM_HF.items() if v is not None}
        try:
            return convert_weights.get_mapped_key(tune_name, inverted)
        except Exception:  # noqa: BLE001 - a name outside torchtune's table keeps its own
            return tune_name
