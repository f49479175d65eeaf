"""The one mapping between Hugging Face weight names and the names of
:func:`~torchtune_prefopt.models.hf.builder.build_decoder`'s parameters.

It is a pure renaming (no tensor changes): the builder uses HF's RoPE layout, so q/k rows are
not permuted (torchtune's ``convert_weights.hf_to_tune`` permutes them for its interleaved
RoPE). One table, :data:`_LAYER_NAMES`, drives both directions and the PEFT adapter names.

=====================================  ============================================
Hugging Face                           torchtune
=====================================  ============================================
model.embed_tokens.weight              tok_embeddings.weight
model.layers.N.input_layernorm.weight  layers.N.sa_norm.scale
model.layers.N.self_attn.q_proj.*      layers.N.attn.q_proj.*   (k, v likewise)
model.layers.N.self_attn.o_proj.*      layers.N.attn.output_proj.*
model.layers.N.self_attn.q_norm.weight layers.N.attn.q_norm.scale (k_norm likewise)
model.layers.N.post_attention_layernorm.weight  layers.N.mlp_norm.scale
model.layers.N.mlp.gate_proj.*         layers.N.mlp.w1.*  (down_proj: w2, up_proj: w3)
model.norm.weight                      norm.scale
lm_head.weight                         output.weight (absent when tied)
=====================================  ============================================
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping

from torch import Tensor

from torchtune_prefopt.errors import PrefOptUserError

__all__ = [
    "hf_to_tune",
    "peft_adapter_weights",
    "peft_target_modules",
    "tune_to_hf",
]

#: (HF name inside a layer, torchtune name inside a layer); ``{p}`` = weight or bias
_LAYER_NAMES = (
    ("input_layernorm.weight", "sa_norm.scale"),
    ("post_attention_layernorm.weight", "mlp_norm.scale"),
    ("self_attn.q_proj.{p}", "attn.q_proj.{p}"),
    ("self_attn.k_proj.{p}", "attn.k_proj.{p}"),
    ("self_attn.v_proj.{p}", "attn.v_proj.{p}"),
    ("self_attn.o_proj.{p}", "attn.output_proj.{p}"),
    ("self_attn.q_norm.weight", "attn.q_norm.scale"),
    ("self_attn.k_norm.weight", "attn.k_norm.scale"),
    ("mlp.gate_proj.{p}", "mlp.w1.{p}"),
    ("mlp.down_proj.{p}", "mlp.w2.{p}"),
    ("mlp.up_proj.{p}", "mlp.w3.{p}"),
)
_TOP_NAMES = (
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.scale"),
    ("lm_head.weight", "output.weight"),
)
#: torchtune module name -> HF module name (LoRA targets)
_MODULES = {
    "q_proj": "q_proj",
    "k_proj": "k_proj",
    "v_proj": "v_proj",
    "output_proj": "o_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
    "output": "lm_head",
}


def _table() -> Dict[str, str]:
    """HF name pattern -> torchtune name pattern (``{n}`` = layer index)."""
    table = dict(_TOP_NAMES)
    for hf, tune in _LAYER_NAMES:
        for p in ("weight", "bias") if "{p}" in hf else (None,):
            h = f"model.layers.{{n}}.{hf}".replace("{p}", p or "")
            t = f"layers.{{n}}.{tune}".replace("{p}", p or "")
            table[h] = t
    return table


_HF_TO_TUNE = _table()
_TUNE_TO_HF = {t: h for h, t in _HF_TO_TUNE.items()}
_LAYER = re.compile(r"^(model\.layers|layers)\.(\d+)\.(.+)$")


def _rename(name: str, table: Mapping[str, str], prefix: str) -> str:
    m = _LAYER.match(name)
    if m is None:
        return table[name]
    return table[f"{prefix}.{{n}}.{m.group(3)}"].replace("{n}", m.group(2))


def hf_to_tune(
    sd: Mapping[str, Tensor], tie_word_embeddings: bool, source: object
) -> Dict[str, Tensor]:
    """HF weights -> torchtune names. A tied model's ``lm_head.weight`` (``save_pretrained``
    leaves it out; some exporters keep a copy) is dropped; an unknown name is one line."""
    out = {}
    for name, value in sd.items():
        if name == "lm_head.weight" and tie_word_embeddings:
            continue
        if name.endswith("rotary_emb.inv_freq"):  # buffers some old exporters saved
            continue
        try:
            out[_rename(name, _HF_TO_TUNE, "model.layers")] = value
        except KeyError:
            raise PrefOptUserError(
                f"checkpoint {source}: weight {name!r} has no counterpart in the model built "
                "from config.json (an option the builder does not know?)"
            ) from None
    return out


def tune_to_hf(sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """torchtune names -> HF weights (the inverse of :func:`hf_to_tune`)."""
    return {_rename(name, _TUNE_TO_HF, "layers"): value for name, value in sd.items()}


def peft_adapter_weights(adapter_sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """torchtune adapter weights (``layers.N.attn.q_proj.lora_a.weight``, ``...magnitude``)
    -> PEFT names (``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``,
    ``...lora_magnitude_vector``)."""
    out = {}
    for name, value in adapter_sd.items():
        module, _, leaf = name.rpartition(".lora_")
        if not module:  # DoRA magnitude: <module>.magnitude
            module, leaf = name[: -len(".magnitude")], None
        hf_module = _rename(f"{module}.weight", _TUNE_TO_HF, "layers")[: -len(".weight")]
        if leaf is None:
            out[f"base_model.model.{hf_module}.lora_magnitude_vector"] = value
        else:
            out[f"base_model.model.{hf_module}.lora_{leaf[0].upper()}{leaf[1:]}"] = value
    return out


def peft_target_modules(tune_modules: Iterable[str]) -> List[str]:
    """PEFT ``target_modules`` (HF module names) of torchtune LoRA module names."""
    return [_MODULES[m] for m in tune_modules]
