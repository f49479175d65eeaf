"""LoRA bookkeeping for the recipe: settings from the model config, a deterministic adapter
init, the merged export and the PEFT adapter config."""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn
from torchtune.modules.peft import (
    DoRALinear,
    LoRALinear,
    get_lora_module_names,
    get_merged_lora_ckpt,
)

__all__ = ["adapter_config", "lora_init_state", "lora_settings", "merged_lora_state_dict"]


def lora_settings(model_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """``{"rank", "alpha", "modules"}`` of a ``lora_*`` model builder's config."""
    return {
        "rank": model_cfg["lora_rank"],
        "alpha": model_cfg["lora_alpha"],
        "modules": get_lora_module_names(
            list(model_cfg["lora_attn_modules"]),
            model_cfg.get("apply_lora_to_mlp", False),
            model_cfg.get("apply_lora_to_output", False),
        ),
    }


def lora_init_state(model: nn.Module, seed: int, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Adapter weights as full tensors, the same on any number of ranks: A ~ U(-1/sqrt(in),
    1/sqrt(in)) (``kaiming_uniform_(a=sqrt(5))``'s bound, torchtune's init) from a generator
    seeded with ``seed``, B = 0 (so the adapted model starts equal to the base)."""
    out = {}
    g = torch.Generator().manual_seed(seed)
    for name, mod in model.named_modules():
        if isinstance(mod, (LoRALinear, DoRALinear)):
            a = torch.empty(tuple(mod.lora_a.weight.shape), dtype=torch.float32)
            bound = 1.0 / math.sqrt(a.shape[1])
            a.uniform_(-bound, bound, generator=g)
            out[f"{name}.lora_a.weight"] = a.to(dtype)
            out[f"{name}.lora_b.weight"] = torch.zeros(tuple(mod.lora_b.weight.shape), dtype=dtype)
    return out


def merged_lora_state_dict(
    full_sd: Dict[str, torch.Tensor], settings: Mapping[str, Any]
) -> Dict[str, torch.Tensor]:
    """The plain model's weights with ``B @ A * alpha / rank`` merged in.

    torchtune's ``get_merged_lora_ckpt`` adds into the base weights *in place*, and on one CPU
    rank a gathered state dict aliases the live parameters: the merge goes into copies of the
    adapted base weights, so the live model is never changed.
    """
    bases = {k[: -len("lora_a.weight")] + "weight" for k in full_sd if k.endswith(".lora_a.weight")}
    return get_merged_lora_ckpt(
        {k: (v.clone() if k in bases else v) for k, v in full_sd.items()},
        rank=settings["rank"],
        alpha=settings["alpha"],
    )


def adapter_config(settings: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The PEFT ``adapter_config.json`` content."""
    return {
        "r": settings["rank"],
        "lora_alpha": settings["alpha"],
        "target_modules": settings["modules"],
        "peft_type": "LORA",
    }
