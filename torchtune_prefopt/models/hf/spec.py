"""What a Hugging Face ``config.json`` says about a decoder: the one reader of that file.

:func:`read_spec` turns a model folder's ``config.json`` into a :class:`DecoderSpec`: every
option that changes the numbers a decoder computes (sizes, tied embeddings, attention and MLP
biases, q/k norms, head_dim, RoPE theta and scaling, norm eps, activation), read the way
``transformers`` reads it (5.x ``rope_parameters`` or the older ``rope_theta`` +
``rope_scaling``). An architecture or option the builder cannot reproduce exactly is one
:class:`~torchtune_prefopt.errors.PrefOptUserError` line naming the value and what is
supported, before any weight is read: never a silently different model.

Supported (``architectures[0]``, or ``model_type`` when a folder has no ``architectures``, as
``transformers`` reads it): ``LlamaForCausalLM`` (Llama 2/3.x, SmolLM2, and other
Llama-architecture models), ``MistralForCausalLM``, ``Qwen2ForCausalLM`` (Qwen2 / 2.5),
``Qwen3ForCausalLM``, the Mixture-of-Experts ``Qwen3MoeForCausalLM`` (top-k softmax
routing, ``norm_topk_prob``, dense layers from ``mlp_only_layers`` / ``decoder_sparse_step``)
and ``MixtralForCausalLM`` (top-k routing, weights renormalised), and Gemma 3's text model
``Gemma3ForCausalLM`` (scaled embeddings, ``1 + w`` norms around attention and MLP, q/k
norms, ``query_pre_attn_scalar``, sliding-window layers with their own RoPE), Gemma 2's
``Gemma2ForCausalLM`` (the same without q/k norms, plus attention and final logit
soft-capping, alternating sliding layers), and ``Phi3ForCausalLM`` (Phi-3 / Phi-4: fused
``qkv_proj`` and ``gate_up_proj``, ``partial_rotary_factor``). Refused with a pointer:
Gemma 1, gpt-oss (attention sinks), DeepSeek (MLA), multimodal
models, ``longrope`` scaling (Phi-3 128k).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from torchtune_prefopt.errors import PrefOptUserError

__all__ = [
    "MOE_FAMILIES",
    "SUPPORTED_ARCHITECTURES",
    "DecoderSpec",
    "GemmaSpec",
    "MoESpec",
    "RopeSpec",
    "read_config_json",
    "read_spec",
]

#: architectures value -> family name used below
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
}
#: config.json model_type -> architecture (a folder without ``architectures``)
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
#: the families whose MLP is a Mixture of Experts
MOE_FAMILIES = ("qwen3_moe", "mixtral")
#: architectures that are refused, with what to use instead
_REFUSED = {
    "Gemma": "Gemma 1 is not built here (Gemma 2 and Gemma 3's text model are); use "
    "torchtune.models.gemma builders with FullModelHFCheckpointer (model_type GEMMA)",
    "GptOss": "gpt-oss has attention sinks and its own MoE, which this builder does not have",
    "Deepseek": "DeepSeek's multi-head latent attention (MLA) is not built here",
    "Olmoe": "OLMoE is not built here yet (Qwen3-MoE and Mixtral are)",
}
#: words in an architecture name that mean "not a text-only decoder"
_MULTIMODAL = ("ConditionalGeneration", "Vision", "ForImageTextToText")
#: RoPE types reproduced exactly
ROPE_TYPES = ("default", "linear", "llama3")
#: activations reproduced exactly (config hidden_act / hidden_activation)
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding settings (HF's ``rope_type`` and its parameters)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    #: the share of each head's dimensions that is rotated (Phi-3/4: the first ones)
    partial: float = 1.0


@dataclass(frozen=True)
class DecoderSpec:
    """A decoder as ``config.json`` describes it (the builder's only input)."""

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    rope: RopeSpec
    tie_word_embeddings: bool
    qkv_bias: bool
    output_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: Optional[int]
    moe: Optional["MoESpec"] = None
    #: Gemma 3: ``1 + w`` norms in fp32, embeddings times sqrt(hidden), norms after attention
    #: and MLP too, scores scaled by ``query_pre_attn_scalar ** -0.5``, the sliding layers'
    #: window and their own RoPE
    gemma: Optional["GemmaSpec"] = None
    activation: str = "silu"
    #: Phi-3/4: one ``qkv_proj`` and one ``gate_up_proj`` weight in the files (split into
    #: torchtune's projections on load, fused again on save: ``weights.unfuse`` / ``fuse``)
    fused_projections: bool = False


@dataclass(frozen=True)
class GemmaSpec:
    """What Gemma 3's text decoder adds to a Llama-style layer (``transformers``'
    ``Gemma3ForCausalLM``): ``layer_windows[i]`` is layer ``i``'s sliding window (``None``:
    full attention), ``local_rope`` the sliding layers' RoPE (the full layers use
    ``DecoderSpec.rope``), ``query_scale`` ``query_pre_attn_scalar`` (scores are
    ``q.k / sqrt(query_scale)``)."""

    layer_windows: Tuple[Optional[int], ...]
    local_rope: RopeSpec
    query_scale: float
    #: Gemma 2: scores and final logits soft-capped, ``cap * tanh(x / cap)`` (None: not)
    attn_softcap: Optional[float] = None
    final_softcap: Optional[float] = None


@dataclass(frozen=True)
class MoESpec:
    """A Mixture-of-Experts MLP: ``num_experts`` SwiGLU experts of width ``expert_size``,
    ``top_k`` of them per token by softmax router probability, their weights renormalised to
    sum 1 when ``norm_topk_prob``; ``sparse_layers[i]``: layer ``i`` is MoE (else a dense MLP
    of the config's ``intermediate_size``); ``fp32_weights``: the routing weights stay fp32 when
    they scale an expert's output (Mixtral) instead of the model dtype (Qwen3-MoE)."""

    num_experts: int
    top_k: int
    expert_size: int
    norm_topk_prob: bool
    sparse_layers: Tuple[bool, ...]
    fp32_weights: bool


def read_config_json(model_dir: Any) -> Tuple[Path, Dict[str, Any]]:
    """``(folder, config)`` of an HF model folder; one line if it is not one."""
    if model_dir is None or str(model_dir).strip() in ("", "???"):
        raise PrefOptUserError(
            "model_dir: not set; pass the Hugging Face model folder (config.json, "
            "*.safetensors, tokenizer.json), e.g. model_dir=/tmp/SmolLM2-135M-Instruct"
        )
    folder = Path(str(model_dir)).expanduser()
    path = folder / "config.json"
    if not folder.is_dir():
        raise PrefOptUserError(f"model_dir: {folder} is not a folder")
    if not path.is_file():
        raise PrefOptUserError(
            f"model_dir: {folder} has no config.json: it is not a Hugging Face model folder"
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PrefOptUserError(f"model_dir: {path} is not readable JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise PrefOptUserError(f"model_dir: {path} is not a JSON object")
    return folder, cfg


def _rope(
    cfg: Mapping[str, Any], where: str, layer_type: Optional[str] = None, family: str = ""
) -> RopeSpec:
    params = dict(cfg.get("rope_parameters") or {})  # transformers >= 5
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])  # Gemma 3 in transformers 5: one per layer type
    elif layer_type == "sliding_attention":  # Gemma 3 Hub files: rope_local_base_freq
        return RopeSpec(theta=float(cfg.get("rope_local_base_freq", 10000.0)))
    scaling = cfg.get("rope_scaling") or {}  # transformers < 5
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise PrefOptUserError(f"{where}: rope_parameters / rope_scaling must be objects")
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise PrefOptUserError(
            f"{where}: rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    partial = merged.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    partial = 1.0 if partial is None else float(partial)
    if partial != 1.0 and family != "phi3":
        raise PrefOptUserError(
            f"{where}: partial_rotary_factor {partial} is not supported (only 1.0; Phi-3/4 "
            "rotate a part of each head)"
        )
    kw = {"partial": partial}
    if rope_type in ("linear", "llama3"):
        kw["factor"] = float(merged["factor"])
    if rope_type == "llama3":
        kw.update(
            low_freq_factor=float(merged["low_freq_factor"]),
            high_freq_factor=float(merged["high_freq_factor"]),
            original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
        )
    return RopeSpec(theta=float(theta), rope_type=rope_type, **kw)


def _sliding_window(cfg: Mapping[str, Any], family: str) -> Optional[int]:
    """The attention window if one applies to any layer (else ``None``)."""
    window = cfg.get("sliding_window")
    if family in ("qwen2", "qwen3", "qwen3_moe") and not cfg.get("use_sliding_window", False):
        window = None
    layer_types = cfg.get("layer_types") or []
    if layer_types and all(t == "full_attention" for t in layer_types):
        window = None
    return int(window) if window else None


def _gemma(cfg: Mapping[str, Any], family: str, num_layers: int, where: str) -> Optional[GemmaSpec]:
    """Gemma 3's layer types (``layer_types``, or every ``sliding_window_pattern``-th layer
    global in Hub files), windows, local RoPE and query scale."""
    if family not in ("gemma2", "gemma3"):
        return None
    types = cfg.get("layer_types")
    if not types:  # Hub files: Gemma 2 alternates, Gemma 3 has one global layer in six
        default = 6 if family == "gemma3" else 2
        pattern = int(cfg.get("sliding_window_pattern", default) or default)
        types = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(num_layers)
        ]
    if len(types) != num_layers or not set(types) <= {"sliding_attention", "full_attention"}:
        raise PrefOptUserError(
            f"{where}: layer_types {types!r} is not one of sliding/full per layer"
        )
    window = cfg.get("sliding_window")
    if cfg.get("use_bidirectional_attention"):
        raise PrefOptUserError(f"{where}: use_bidirectional_attention is not supported (a decoder)")
    return GemmaSpec(
        layer_windows=tuple(
            int(window) if t == "sliding_attention" and window else None for t in types
        ),
        local_rope=_rope(cfg, where, "sliding_attention" if family == "gemma3" else None),
        query_scale=float(cfg.get("query_pre_attn_scalar", 256)),
        attn_softcap=_cap(cfg, "attn_logit_softcapping", family, where),
        final_softcap=_cap(cfg, "final_logit_softcapping", family, where),
    )


def _cap(cfg: Mapping[str, Any], key: str, family: str, where: str) -> Optional[float]:
    value = cfg.get(key)
    if value is None:
        return None
    if family != "gemma2" or not float(value) > 0:
        raise PrefOptUserError(f"{where}: {key} {value!r} is not supported here (Gemma 2's only)")
    return float(value)


def _moe(cfg: Mapping[str, Any], family: str, num_layers: int, where: str) -> Optional[MoESpec]:
    """The MoE settings as ``transformers`` reads them (``num_experts`` in Hub files,
    ``num_local_experts`` in transformers 5's), or ``None`` for a dense family."""
    if family not in MOE_FAMILIES:
        return None
    n = cfg.get("num_experts", cfg.get("num_local_experts"))
    if n is None:
        raise PrefOptUserError(f"{where}: missing 'num_experts' / 'num_local_experts'")
    if family == "mixtral":
        if float(cfg.get("router_jitter_noise") or 0.0) != 0.0:
            raise PrefOptUserError(
                f"{where}: router_jitter_noise {cfg['router_jitter_noise']} is not supported "
                "(only 0: transformers multiplies the hidden states by noise in training)"
            )
        return MoESpec(
            num_experts=int(n),
            top_k=int(cfg.get("num_experts_per_tok", 2)),
            expert_size=int(cfg["intermediate_size"]),
            norm_topk_prob=True,
            sparse_layers=(True,) * num_layers,
            fp32_weights=True,
        )
    dense = set(cfg.get("mlp_only_layers") or [])
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    return MoESpec(
        num_experts=int(n),
        top_k=int(cfg.get("num_experts_per_tok", 8)),
        expert_size=int(cfg["moe_intermediate_size"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        sparse_layers=tuple(
            i not in dense and int(n) > 0 and (i + 1) % step == 0 for i in range(num_layers)
        ),
        fp32_weights=False,
    )


def read_spec(model_dir: Any) -> DecoderSpec:
    """The :class:`DecoderSpec` of ``model_dir/config.json``, or one line saying why not."""
    folder, cfg = read_config_json(model_dir)
    where = f"model_dir: {folder / 'config.json'}"
    archs = cfg.get("architectures") or []
    if isinstance(archs, list) and archs:
        arch = archs[0]
    else:  # transformers reads such a folder from its model_type
        arch = MODEL_TYPES.get(cfg.get("model_type"), cfg.get("model_type", "?"))
    family = SUPPORTED_ARCHITECTURES.get(arch)
    if family is None:
        why = next((w for k, w in _REFUSED.items() if str(arch).startswith(k)), None)
        if any(w in str(arch) for w in _MULTIMODAL):
            why = "a multimodal model; only the text decoders (...ForCausalLM) are built here"
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise PrefOptUserError(
            f"{where}: architectures {arch!r} is not supported by torchtune_prefopt.models.hf "
            f"(supported: {supported})" + (f"; {why}" if why else "")
        )
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
        raise PrefOptUserError(
            f"{where}: hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
        )
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key) is not None and family != "gemma2":
            raise PrefOptUserError(f"{where}: {key} is not supported (only null)")
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = cfg.get("head_dim") or hidden // heads
        spec = DecoderSpec(
            architecture=arch,
            family=family,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=_rope(cfg, where, "full_attention" if family == "gemma3" else None, family),
            tie_word_embeddings=bool(
                cfg.get("tie_word_embeddings", False)
            ),  # every class's default
            qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            output_bias=family != "qwen2" and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=family in ("qwen3", "qwen3_moe", "gemma3"),
            sliding_window=None if family in ("gemma2", "gemma3") else _sliding_window(cfg, family),
            moe=_moe(cfg, family, int(cfg["num_hidden_layers"]), where),
            gemma=_gemma(cfg, family, int(cfg["num_hidden_layers"]), where),
            activation=act,
            fused_projections=family == "phi3",
        )
    except PrefOptUserError:
        raise
    except KeyError as err:
        raise PrefOptUserError(f"{where}: missing {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:
        raise PrefOptUserError(f"{where}: {err}") from None
    if spec.num_heads % spec.num_kv_heads:
        raise PrefOptUserError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    return spec
