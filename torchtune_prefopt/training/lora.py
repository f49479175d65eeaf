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


def lora_init_state(
    model: nn.Module,
    seed: int,
    dtype: torch.dtype,
    base_sd: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    """Adapter weights as full tensors, the same on any number of ranks: A ~ U(-1/sqrt(in),
    1/sqrt(in)) (``kaiming_uniform_(a=sqrt(5))``'s bound, torchtune's init) from a generator
    seeded with ``seed``, B = 0 (so the adapted model starts equal to the base). DoRA layers
    also get their magnitude, ``||W + BA||`` per output row = ``||W||`` at B = 0 (torchtune's
    ``initialize_dora_magnitude``), from the base weights ``base_sd``."""
    out = {}
    g = torch.Generator().manual_seed(seed)
    for name, mod in model.named_modules():
        if isinstance(mod, (LoRALinear, DoRALinear)):
            a = torch.empty(tuple(mod.lora_a.weight.shape), dtype=torch.float32)
            bound = 1.0 / math.sqrt(a.shape[1])
            a.uniform_(-bound, bound, generator=g)
            out[f"{name}.lora_a.weight"] = a.to(dtype)
            out[f"{name}.lora_b.weight"] = torch.zeros(tuple(mod.lora_b.weight.shape), dtype=dtype)
        if isinstance(mod, DoRALinear):
            if base_sd is None or f"{name}.weight" not in base_sd:
                raise ValueError(
                    f"DoRA layer {name}: its base weight is needed to initialise the magnitude"
                )
            out[f"{name}.magnitude"] = torch.linalg.norm(base_sd[f"{name}.weight"].to(dtype), dim=1)
    return out


def merged_lora_state_dict(
    full_sd: Dict[str, torch.Tensor], settings: Mapping[str, Any]
) -> Dict[str, torch.Tensor]:
    """The plain model's weights with the adapters merged in: ``W + (alpha/rank) B A`` (LoRA),
    ``m / ||W + (alpha/rank) B A|| * (W + (alpha/rank) B A)`` per output row (DoRA).

    Two fixes on top of torchtune's ``get_merged_lora_ckpt``: it adds into the base weights
    *in place*, and on one CPU rank a gathered state dict aliases the live parameters, so the
    merge goes into copies; and for DoRA it leaves a layer's bias as is, while torchtune's
    ``DoRALinear.forward`` scales the bias by the same ``m / ||...||`` (Qwen2's q/k/v have
    biases), so the bias is scaled here, making the merged model compute what the trained one
    does.
    """
    bases = {k[: -len("lora_a.weight")] + "weight" for k in full_sd if k.endswith(".lora_a.weight")}
    sd = {k: (v.clone() if k in bases else v) for k, v in full_sd.items()}
    scaling = settings["alpha"] / settings["rank"]
    for key in [k for k in sd if k.endswith(".magnitude")]:
        module = key[: -len(".magnitude")]
        if f"{module}.bias" not in sd:
            continue
        a, b = sd[f"{module}.lora_a.weight"], sd[f"{module}.lora_b.weight"]
        weight = sd[f"{module}.weight"].to(a.dtype) + scaling * (b @ a)
        scale = sd[key] / torch.linalg.norm(weight, dim=1).to(weight.dtype)
        sd[f"{module}.bias"] = sd[f"{module}.bias"] * scale.to(sd[f"{module}.bias"].dtype)
    return get_merged_lora_ckpt(sd, rank=settings["rank"], alpha=settings["alpha"])


def adapter_config(settings: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The PEFT ``adapter_config.json`` content."""
    return {
        "r": settings["rank"],
        "lora_alpha": settings["alpha"],
        "target_modules": settings["modules"],
        "peft_type": "LORA",
    }
