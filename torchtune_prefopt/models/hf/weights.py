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

Phi-3/4: ``self_attn.qkv_proj.weight`` (rows ``[q | k | v]``) and ``mlp.gate_up_proj.weight``
(``[gate | up]``) are split into the projections above on load and fused again on save
(:func:`unfuse` / :func:`fuse`); a LoRA adapter on a part has no PEFT name (PEFT adapts the
fused module), so a Phi-3 LoRA run exports the merged weights only.

Gemma 2 and 3: ``post_attention_layernorm`` -> ``sa_scale.scale`` (after attention),
``pre_feedforward_layernorm`` -> ``mlp_norm.scale``, ``post_feedforward_layernorm`` ->
``mlp_scale.scale``.

Mixture-of-Experts layers (:func:`layer_names` of the family)::

    Qwen3-MoE  model.layers.N.mlp.gate.weight                    layers.N.mlp.router.weight
               model.layers.N.mlp.experts.E.gate_proj.*          layers.N.mlp.experts.E.w1.*
               (up_proj: w3, down_proj: w2)
    Mixtral    model.layers.N.block_sparse_moe.gate.weight       layers.N.mlp.router.weight
               model.layers.N.block_sparse_moe.experts.E.w1.*    layers.N.mlp.experts.E.w1.*
               (w2, w3 likewise)
"""

from __future__ import annotations

import functools
import re
from typing import Any, Dict, Iterable, List, Mapping, Tuple

import torch
from torch import Tensor

from torchtune_prefopt.errors import PrefOptUserError

__all__ = [
    "fuse",
    "hf_name",
    "hf_to_tune",
    "layer_names",
    "peft_adapter_weights",
    "peft_target_modules",
    "tune_to_hf",
    "unfuse",
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
#: extra rows of the MoE families (``{e}`` = expert index)
_MOE_NAMES = {
    "qwen3_moe": (
        ("mlp.gate.weight", "mlp.router.weight"),
        ("mlp.experts.{e}.gate_proj.{p}", "mlp.experts.{e}.w1.{p}"),
        ("mlp.experts.{e}.down_proj.{p}", "mlp.experts.{e}.w2.{p}"),
        ("mlp.experts.{e}.up_proj.{p}", "mlp.experts.{e}.w3.{p}"),
    ),
    "mixtral": (
        ("block_sparse_moe.gate.weight", "mlp.router.weight"),
        ("block_sparse_moe.experts.{e}.w1.{p}", "mlp.experts.{e}.w1.{p}"),
        ("block_sparse_moe.experts.{e}.w2.{p}", "mlp.experts.{e}.w2.{p}"),
        ("block_sparse_moe.experts.{e}.w3.{p}", "mlp.experts.{e}.w3.{p}"),
    ),
}
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


#: rows a family names differently (HF name -> torchtune name): Gemma 3 normalises before and
#: after attention and the MLP, and its ``post_attention_layernorm`` follows attention
_GEMMA_NORMS = (
    ("post_attention_layernorm.weight", "sa_scale.scale"),
    ("pre_feedforward_layernorm.weight", "mlp_norm.scale"),
    ("post_feedforward_layernorm.weight", "mlp_scale.scale"),
)
_FAMILY_NAMES = {
    "gemma2": _GEMMA_NORMS,
    "gemma3": _GEMMA_NORMS,
}


def layer_names(family: str = "llama") -> tuple:
    """``(HF name, torchtune name)`` patterns inside a layer of ``family``."""
    rows = dict(_LAYER_NAMES)
    rows.update(dict(_FAMILY_NAMES.get(family, ())))
    return tuple(rows.items()) + _MOE_NAMES.get(family, ())


@functools.lru_cache(maxsize=None)
def _tables(family: str) -> Tuple[Dict[str, str], Dict[str, str]]:
    """(HF -> torchtune, torchtune -> HF) name patterns (``{n}`` layer, ``{e}`` expert)."""
    table = dict(_TOP_NAMES)
    for hf, tune in layer_names(family):
        for p in ("weight", "bias") if "{p}" in hf else (None,):
            h = f"model.layers.{{n}}.{hf}".replace("{p}", p or "")
            t = f"layers.{{n}}.{tune}".replace("{p}", p or "")
            table[h] = t
    return table, {t: h for h, t in table.items()}


_LAYER = re.compile(r"^(model\.layers|layers)\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(.+)$")


def _rename(name: str, table: Mapping[str, str], prefix: str) -> str:
    m = _LAYER.match(name)
    if m is None:
        return table[name]
    rest, expert = m.group(3), None
    e = _EXPERT.match(rest)
    if e is not None:
        rest, expert = f"{e.group(1)}.{{e}}.{e.group(3)}", e.group(2)
    out = table[f"{prefix}.{{n}}.{rest}"].replace("{n}", m.group(2))
    return out if expert is None else out.replace("{e}", expert)


def hf_to_tune(
    sd: Mapping[str, Tensor], tie_word_embeddings: bool, source: object, family: str = "llama"
) -> Dict[str, Tensor]:
    """HF weights -> torchtune names. A tied model's ``lm_head.weight`` (``save_pretrained``
    leaves it out; some exporters keep a copy) is dropped; an unknown name is one line."""
    out = {}
    hf_to_tune_names = _tables(family)[0]
    head, embed = sd.get("lm_head.weight"), sd.get("model.embed_tokens.weight")
    if tie_word_embeddings and head is not None and embed is not None:
        if not torch.equal(head, embed):  # shapes too; no [vocab, dim] bool tensor
            raise PrefOptUserError(
                f"checkpoint {source}: config.json says tie_word_embeddings: true, but the "
                "file's lm_head.weight differs from model.embed_tokens.weight; transformers "
                "would tie them and drop that head, a different model: set "
                "tie_word_embeddings to false if the head is meant, or remove lm_head.weight"
            )
    for name, value in sd.items():
        if name == "lm_head.weight" and tie_word_embeddings:
            continue
        if name.endswith("rotary_emb.inv_freq"):  # buffers some old exporters saved
            continue
        try:
            out[_rename(name, hf_to_tune_names, "model.layers")] = value
        except KeyError:
            raise PrefOptUserError(
                f"checkpoint {source}: weight {name!r} has no counterpart in the model built "
                "from config.json (an option the builder does not know?)"
            ) from None
    return out


def tune_to_hf(sd: Mapping[str, Tensor], family: str = "llama") -> Dict[str, Tensor]:
    """torchtune names -> HF weights (the inverse of :func:`hf_to_tune`)."""
    names = _tables(family)[1]
    return {_rename(name, names, "layers"): value for name, value in sd.items()}


#: Phi-3/4's fused weights: (fused HF name in a layer, the parts in order)
_FUSED = (
    (
        "self_attn.qkv_proj.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    ),
    ("mlp.gate_up_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
)


def _part_sizes(spec: Any) -> Dict[str, List[int]]:
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return {
        "self_attn.qkv_proj.weight": [q, kv, kv],
        "mlp.gate_up_proj.weight": [spec.intermediate_size] * 2,
    }


def unfuse(sd: Mapping[str, Tensor], spec: Any) -> Dict[str, Tensor]:
    """HF weights with Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` split into the separate
    projections (rows ``[q | k | v]`` and ``[gate | up]``, as ``transformers`` slices them),
    so the one name table applies; any other family unchanged."""
    if not spec.fused_projections:
        return dict(sd)
    sizes, out = _part_sizes(spec), {}
    for name, value in sd.items():
        m = _LAYER.match(name)
        fused = dict(_FUSED).get(m.group(3)) if m else None
        if fused is None:
            out[name] = value
            continue
        parts = value.split(sizes[m.group(3)], dim=0)
        for part, tensor in zip(fused, parts):
            out[f"model.layers.{m.group(2)}.{part}"] = tensor
    return out


def fuse(sd: Mapping[str, Tensor], spec: Any) -> Dict[str, Tensor]:
    """The inverse of :func:`unfuse` (the export writes the files' own layout)."""
    if not spec.fused_projections:
        return dict(sd)
    out, parts = {}, {}
    for name, value in sd.items():
        m = _LAYER.match(name)
        owner = next((f for f, ps in _FUSED if m and m.group(3) in ps), None)
        if owner is None:
            out[name] = value
        else:
            parts.setdefault((m.group(2), owner), {})[m.group(3)] = value
    for (layer, owner), got in parts.items():
        order = dict(_FUSED)[owner]
        out[f"model.layers.{layer}.{owner}"] = torch.cat([got[p] for p in order], dim=0)
    return out


def hf_name(tune_name: str, family: str = "llama") -> str:
    """The HF name of one torchtune parameter name (messages speak the user's names); the
    name itself when it has none."""
    try:
        return _rename(tune_name, _tables(family)[1], "layers")
    except KeyError:
        return tune_name


def peft_adapter_weights(
    adapter_sd: Mapping[str, Tensor], family: str = "llama"
) -> Dict[str, Tensor]:
    """torchtune adapter weights (``layers.N.attn.q_proj.lora_a.weight``, ``...magnitude``)
    -> PEFT names (``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``,
    ``...lora_magnitude_vector``)."""
    out = {}
    for name, value in adapter_sd.items():
        module, _, leaf = name.rpartition(".lora_")
        if not module:  # DoRA magnitude: <module>.magnitude
            module, leaf = name[: -len(".magnitude")], None
        hf_module = _rename(f"{module}.weight", _tables(family)[1], "layers")[: -len(".weight")]
        if leaf is None:
            out[f"base_model.model.{hf_module}.lora_magnitude_vector"] = value
        else:
            out[f"base_model.model.{hf_module}.lora_{leaf[0].upper()}{leaf[1:]}"] = value
    return out


def peft_target_modules(tune_modules: Iterable[str], family: str = "llama") -> List[str]:
    """PEFT ``target_modules`` (HF module names) of torchtune LoRA module names (Mixtral's
    experts keep their own ``w1``/``w2``/``w3``)."""
    own = {"w1": "w1", "w2": "w2", "w3": "w3"} if family == "mixtral" else {}
    return [own.get(m, _MODULES[m]) for m in tune_modules]
