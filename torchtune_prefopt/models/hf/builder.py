"""torchtune decoders built from a Hugging Face folder's ``config.json`` alone.

``hf_decoder(model_dir)`` / ``lora_hf_decoder(model_dir, ...)`` are ``model`` components:
the architecture and every option that changes the numbers come from
:func:`~torchtune_prefopt.models.hf.spec.read_spec`; the model is made of torchtune's own
modules (``TransformerDecoder``, ``TransformerSelfAttentionLayer``, ``MultiHeadAttention``,
``FeedForward``, ``RMSNorm``, ``TiedLinear``, ``LoRALinear`` / ``DoRALinear``), so FSDP2,
activation checkpointing, per-layer compile, LoRA utilities, packed attention and the lean
log-prob path work unchanged. Two modules are ours (:mod:`~torchtune_prefopt.models.hf.modules`):
HF-layout RoPE and pre-RoPE q/k norms. Parameter names are torchtune's; the mapping to and
from HF names is :mod:`~torchtune_prefopt.models.hf.weights`.

Per layer (``x`` ``[b, s, d]``)::

    h   = x + o_proj(attn(rope(q_norm(q_proj(rms(x)))), rope(k_norm(k_proj(rms(x)))), v_proj(rms(x))))
    out = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))

(a Mixture-of-Experts layer: ``out = h + sum_{e in topk} w_e expert_e(rms(h))``,
:class:`~torchtune_prefopt.models.hf.modules.MoEFeedForward`; LoRA with ``apply_lora_to_mlp``
adapts every expert's three projections, never the router)

then ``logits = lm_head(rms(out))`` (``lm_head`` = the embedding when tied).
"""

from __future__ import annotations

from typing import Any, List, Optional

from torch import nn
from torchtune.models.gemma.rms_norm import GemmaRMSNorm
from torchtune.modules import (
    FeedForward,
    MultiHeadAttention,
    RMSNorm,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)
from torchtune.modules.peft import DoRALinear, LoRALinear

from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.models.hf.modules import (
    HFRotaryEmbedding,
    MoEFeedForward,
    PreRopeNormAttention,
    ScaledEmbedding,
    SoftcappedOutput,
)
from torchtune_prefopt.models.hf.spec import DecoderSpec, read_spec

__all__ = [
    "LORA_MODULES",
    "build_decoder",
    "check_lora_attn_modules",
    "hf_decoder",
    "lora_hf_decoder",
]

#: torchtune names of the attention projections LoRA can adapt (``lora_attn_modules``), for
#: torchtune's builders and ours alike
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")


def check_lora_attn_modules(modules: Any, key: str = "model") -> None:
    """``<key>.lora_attn_modules``: a non-empty list of :data:`LORA_MODULES` (one line
    otherwise); the one check, called by the config check and by :func:`lora_hf_decoder`."""
    if not isinstance(modules, (list, tuple)) or not modules:
        raise PrefOptUserError(
            f"{key}.lora_attn_modules must be a non-empty list of {list(LORA_MODULES)}, got {modules!r}"
        )
    bad = [m for m in modules if m not in LORA_MODULES]
    if bad:
        raise PrefOptUserError(
            f"{key}.lora_attn_modules: unknown module {bad[0]!r} (valid: {', '.join(LORA_MODULES)})"
        )


def _linear(in_dim, out_dim, bias, lora) -> nn.Module:
    if lora is None:
        return nn.Linear(in_dim, out_dim, bias=bias)
    cls = DoRALinear if lora["use_dora"] else LoRALinear
    return cls(
        in_dim,
        out_dim,
        rank=lora["rank"],
        alpha=lora["alpha"],
        dropout=lora["dropout"],
        use_bias=bias,
        quantize_base=lora["quantize_base"],
    )


#: config activation -> the module ``transformers`` uses for it
_ACTIVATIONS = {"silu": lambda: nn.SiLU(), "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh")}


def _swiglu(d: int, hidden: int, bias: bool, adapted, activation: str = "silu") -> FeedForward:
    """``down(act(gate(x)) * up(x))``: SwiGLU, or GeGLU with Gemma's tanh GELU."""
    return FeedForward(
        gate_proj=_linear(d, hidden, bias, adapted("w1")),
        down_proj=_linear(hidden, d, bias, adapted("w2")),
        up_proj=_linear(d, hidden, bias, adapted("w3")),
        activation=_ACTIVATIONS[activation](),
    )


def _context(spec: DecoderSpec, max_seq_len: Optional[int], where: str) -> int:
    context = spec.max_position_embeddings if max_seq_len is None else int(max_seq_len)
    if spec.sliding_window is not None and spec.sliding_window < context:
        raise PrefOptUserError(
            f"{where}: sliding_window {spec.sliding_window} is shorter than the context "
            f"{context}: windowed attention is not supported; set model.max_seq_len <= "
            f"{spec.sliding_window} (every row then fits the window and attention is exact)"
        )
    return context


def build_decoder(
    spec: DecoderSpec,
    max_seq_len: int,
    lora_modules: List[str] = (),
    lora: Optional[dict] = None,
) -> TransformerDecoder:
    """The decoder of ``spec`` (``lora``: rank/alpha/dropout/use_dora/quantize_base for the
    projections named in ``lora_modules``: torchtune's names, ``w1``/``w2``/``w3`` for the MLP,
    ``output`` for the head)."""

    def adapted(name):
        return lora if name in lora_modules else None

    d, hd, n_h, n_kv = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    gemma = spec.gemma
    norm = GemmaRMSNorm if gemma is not None else RMSNorm  # Gemma: x * (1 + w), in fp32
    rope = HFRotaryEmbedding(hd, max_seq_len, spec.rope)
    local_rope = HFRotaryEmbedding(hd, max_seq_len, gemma.local_rope) if gemma else None
    ours = spec.qk_norm or gemma is not None  # pre-RoPE norms, query scale, window, cap
    attention_cls = PreRopeNormAttention if ours else MultiHeadAttention
    layers = []
    for i in range(spec.num_layers):
        window = gemma.layer_windows[i] if gemma is not None else None
        attn = attention_cls(
            embed_dim=d,
            num_heads=n_h,
            num_kv_heads=n_kv,
            head_dim=hd,
            q_proj=_linear(d, n_h * hd, spec.qkv_bias, adapted("q_proj")),
            k_proj=_linear(d, n_kv * hd, spec.qkv_bias, adapted("k_proj")),
            v_proj=_linear(d, n_kv * hd, spec.qkv_bias, adapted("v_proj")),
            output_proj=_linear(n_h * hd, d, spec.output_bias, adapted("output_proj")),
            pos_embeddings=local_rope if window is not None else rope,
            q_norm=norm(hd, eps=spec.norm_eps) if spec.qk_norm else None,
            k_norm=norm(hd, eps=spec.norm_eps) if spec.qk_norm else None,
            max_seq_len=max_seq_len,
        )
        if gemma is not None:
            attn.q_scale = (hd / gemma.query_scale) ** 0.5
            attn.sliding_window = window
            attn.softcap = gemma.attn_softcap
        moe = spec.moe
        if moe is not None and moe.sparse_layers[i]:
            mlp = MoEFeedForward(
                router=nn.Linear(d, moe.num_experts, bias=False),
                experts=nn.ModuleList(
                    _swiglu(d, moe.expert_size, False, adapted) for _ in range(moe.num_experts)
                ),
                top_k=moe.top_k,
                norm_topk_prob=moe.norm_topk_prob,
                fp32_weights=moe.fp32_weights,
            )
        else:
            mlp = _swiglu(d, spec.intermediate_size, spec.mlp_bias, adapted, spec.activation)
        # Gemma's norms after attention and after the MLP are torchtune's sa_scale / mlp_scale
        layers.append(
            TransformerSelfAttentionLayer(
                attn=attn,
                mlp=mlp,
                sa_norm=norm(d, eps=spec.norm_eps),
                mlp_norm=norm(d, eps=spec.norm_eps),
                sa_scale=norm(d, eps=spec.norm_eps) if gemma is not None else None,
                mlp_scale=norm(d, eps=spec.norm_eps) if gemma is not None else None,
            )
        )
    embedding_cls = ScaledEmbedding if gemma is not None else nn.Embedding
    tok_embeddings = embedding_cls(spec.vocab_size, d)
    if spec.tie_word_embeddings:
        output = TiedLinear(tok_embeddings)
    else:
        output = _linear(d, spec.vocab_size, False, adapted("output"))
    if gemma is not None and gemma.final_softcap is not None:
        if not spec.tie_word_embeddings:
            raise PrefOptUserError(
                "model: final_logit_softcapping with an untied head is not built (Gemma 2 ties it)"
            )
        output = SoftcappedOutput(output, gemma.final_softcap)
    return TransformerDecoder(
        tok_embeddings=tok_embeddings,
        layers=nn.ModuleList(layers),
        max_seq_len=max_seq_len,
        num_heads=n_h,
        head_dim=hd,
        norm=norm(d, eps=spec.norm_eps),
        output=output,
    )


def hf_decoder(model_dir: str, max_seq_len: Optional[int] = None) -> TransformerDecoder:
    """The decoder described by ``model_dir/config.json`` (weights are the checkpointer's).

    Args:
        model_dir: a Hugging Face model folder.
        max_seq_len: longest sequence (RoPE cache; default ``max_position_embeddings``).
    """
    spec = read_spec(model_dir)
    return build_decoder(spec, _context(spec, max_seq_len, "model"))


def lora_hf_decoder(
    model_dir: str,
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    max_seq_len: Optional[int] = None,
) -> TransformerDecoder:
    """:func:`hf_decoder` with LoRA (or DoRA) adapters on ``lora_attn_modules`` (any of
    ``q_proj``, ``k_proj``, ``v_proj``, ``output_proj``), the MLP projections
    (``apply_lora_to_mlp``) and an untied head (``apply_lora_to_output``); ``W x + (alpha /
    rank) B A x``, Hu et al. 2021 (arXiv 2106.09685)."""
    check_lora_attn_modules(lora_attn_modules)
    spec = read_spec(model_dir)
    if apply_lora_to_output and spec.tie_word_embeddings:
        raise PrefOptUserError(
            "model.apply_lora_to_output: this model ties its output projection to the "
            "embedding (tie_word_embeddings), which LoRA cannot adapt; set it to false"
        )
    modules = list(lora_attn_modules) + (["w1", "w2", "w3"] if apply_lora_to_mlp else [])
    modules += ["output"] if apply_lora_to_output else []
    lora = dict(
        rank=lora_rank,
        alpha=lora_alpha,
        dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
    )
    return build_decoder(spec, _context(spec, max_seq_len, "model"), modules, lora)
