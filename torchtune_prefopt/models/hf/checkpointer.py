"""Reading and writing the weights of :func:`~torchtune_prefopt.models.hf.builder.hf_decoder`
models in a Hugging Face folder (``checkpointer: {_component_: ...hf_checkpointer}``).

It has the interface of torchtune's ``FullModelHFCheckpointer`` that the recipe uses
(``load_checkpoint()`` / ``save_checkpoint(state_dict, epoch, ...)`` writing
``<output_dir>/epoch_<n>``), but converts names with the one mapping in
:mod:`~torchtune_prefopt.models.hf.weights` instead of torchtune's per-``model_type`` code, so
it works for every architecture :mod:`~torchtune_prefopt.models.hf.spec` accepts. A save
writes the shards the folder had (same file names, one ``model.safetensors`` for one file),
the safetensors index for several, the PEFT adapter (``adapter_model.safetensors`` +
``adapter_config.json``) for LoRA, and copies every other file of the folder (``config.json``,
tokenizer files, chat template, ``generation_config.json``), so the result loads in
``transformers`` as the input did. Tied embeddings stay tied (no ``lm_head.weight``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.models.hf import weights
from torchtune_prefopt.models.hf.spec import read_config_json, read_spec

log = logging.getLogger(__name__)

__all__ = ["HFFolderCheckpointer", "hf_checkpointer", "hf_weight_files"]

#: files never copied from the input folder into a written checkpoint
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".gguf")


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


class HFFolderCheckpointer:
    """Weights of an HF model folder, in torchtune names.

    Args:
        model_dir: the folder (``config.json`` + ``*.safetensors`` or ``*.bin``).
        output_dir: where ``save_checkpoint`` writes (``<output_dir>/epoch_<n>``).
    """

    def __init__(self, model_dir: str, output_dir: str) -> None:
        folder, self.config = read_config_json(model_dir)
        self.checkpoint_dir = folder
        self.output_dir = Path(output_dir)
        files = hf_weight_files(folder)
        if not files:
            raise PrefOptUserError(
                f"checkpointer.model_dir: {folder} has no *.safetensors or *.bin weight files"
            )
        self.checkpoint_paths: List[Path] = [folder / f for f in files]
        self.tied = bool(self.config.get("tie_word_embeddings", False))
        self.spec = read_spec(folder)
        self.family = self.spec.family  # which weight-name table (MoE families differ)
        self._file_of: Dict[str, str] = {}

    def load_checkpoint(self) -> Dict[str, Any]:
        from torchtune import training
        from torchtune.training.checkpointing._utils import safe_torch_load

        merged: Dict[str, torch.Tensor] = {}
        for path in self.checkpoint_paths:
            try:
                sd = safe_torch_load(path)
            except Exception as err:  # torchtune wraps every failure in ValueError
                raise ValueError(f"Unable to load checkpoint from {path}") from err
            for name in sd:
                self._file_of[name] = path.name
            merged.update(sd)
        return {
            training.MODEL_KEY: weights.hf_to_tune(
                weights.unfuse(merged, self.spec), self.tied, self.checkpoint_dir, self.family
            )
        }

    def _shards(self, hf_sd: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
        if len(self.checkpoint_paths) == 1 or not self._file_of:
            return {"model.safetensors": hf_sd}
        shards: Dict[str, Dict[str, torch.Tensor]] = {}
        for name, value in hf_sd.items():
            shards.setdefault(self._file_of.get(name, self.checkpoint_paths[-1].name), {})[name] = (
                value
            )
        return shards

    def save_checkpoint(
        self,
        state_dict: Dict[str, Any],
        epoch: int,
        intermediate_checkpoint: bool = False,
        adapter_only: bool = False,
    ) -> None:
        from safetensors.torch import save_file
        from torchtune import training

        dest = self.output_dir / f"epoch_{epoch}"
        dest.mkdir(parents=True, exist_ok=True)
        if not adapter_only:
            hf_sd = weights.fuse(
                weights.tune_to_hf(state_dict[training.MODEL_KEY], self.family), self.spec
            )
            shards = self._shards(hf_sd)
            for fname, shard in shards.items():
                shard = {k: v.contiguous() for k, v in shard.items()}
                save_file(shard, str(dest / _safetensors_name(fname)), metadata={"format": "pt"})
            if len(shards) > 1:
                index = {
                    "metadata": {
                        "total_size": sum(v.numel() * v.element_size() for v in hf_sd.values())
                    },
                    "weight_map": {k: _safetensors_name(f) for f, s in shards.items() for k in s},
                }
                (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        # Phi-3: an adapter on a part of a fused projection has no PEFT name (merged only)
        peft = not self.spec.fused_projections
        if training.ADAPTER_KEY in state_dict and not peft and not adapter_only:
            log.warning(
                "%s: a LoRA adapter on Phi-3's fused projections has no PEFT form; %s holds "
                "the merged weights only",
                self.checkpoint_dir,
                dest,
            )
        if training.ADAPTER_KEY in state_dict and peft:
            adapter = weights.peft_adapter_weights(state_dict[training.ADAPTER_KEY], self.family)
            save_file(
                {k: v.contiguous() for k, v in adapter.items()},
                str(dest / "adapter_model.safetensors"),
                metadata={"format": "pt"},
            )
        elif adapter_only and training.ADAPTER_KEY not in state_dict:
            raise ValueError("adapter_only save without adapter weights")
        if training.ADAPTER_CONFIG in state_dict and peft:
            config = dict(state_dict[training.ADAPTER_CONFIG])
            config["target_modules"] = weights.peft_target_modules(
                config["target_modules"], self.family
            )
            config.setdefault("base_model_name_or_path", str(self.checkpoint_dir))
            config.setdefault("task_type", "CAUSAL_LM")
            (dest / "adapter_config.json").write_text(json.dumps(config, indent=2))
        for src in sorted(self.checkpoint_dir.iterdir()):
            if src.is_file() and not src.name.startswith(".") and not _is_weights(src.name):
                if not (dest / src.name).exists():
                    shutil.copy2(src, dest / src.name)

    def reader(self, checkpoint_dir: Path, output_dir: Path) -> "HFFolderCheckpointer":
        """The same kind of checkpointer over another folder (a step checkpoint)."""
        return HFFolderCheckpointer(str(checkpoint_dir), str(output_dir))


def _safetensors_name(fname: str) -> str:
    return fname if fname.endswith(".safetensors") else Path(fname).stem + ".safetensors"


def _is_weights(name: str) -> bool:
    return name.endswith(_NOT_COPIED) or name == "CHECKPOINT.json"


def hf_checkpointer(
    model_dir: str, output_dir: str, checkpoint_files: Optional[List[str]] = None
) -> HFFolderCheckpointer:
    """``checkpointer`` component over ``model_dir`` (``checkpoint_files`` is accepted for
    config compatibility and must name files of that folder; by default all of them)."""
    ck = HFFolderCheckpointer(model_dir, output_dir)
    if checkpoint_files:
        missing = [f for f in checkpoint_files if not (ck.checkpoint_dir / f).is_file()]
        if missing:
            raise PrefOptUserError(
                f"checkpointer.checkpoint_files: {missing[0]} is not in {ck.checkpoint_dir}"
            )
        ck.checkpoint_paths = [ck.checkpoint_dir / f for f in checkpoint_files]
    return ck
