"""The pieces of a Hugging Face decoder that torchtune 0.6.1's modules do not compute the same
way: rotary embeddings with HF's frequency rules, q/k norms before RoPE, and HF's MoE routing.

* :class:`HFRotaryEmbedding`: RoPE in HF's "rotate half" layout (so weights load without
  permuting q/k rows), with the inverse frequencies of HF's ``rope_type`` ``default``,
  ``linear`` and ``llama3``, computed in fp32 exactly as ``transformers`` computes them.
  torchtune's ``RotaryPositionalEmbeddings`` / ``Llama3ScaledRoPE`` use the interleaved layout
  and need permuted weights; ``Qwen2RotaryPositionalEmbeddings`` knows no scaling.
* :class:`PreRopeNormAttention`: torchtune's ``MultiHeadAttention`` applies ``q_norm`` /
  ``k_norm`` *after* RoPE; Qwen3 normalises each head *before* it (a per-dimension scale does
  not commute with the rotation), so this subclass reorders the two. Everything else --
  ``_attention_call`` (SDPA / flex, our packed attention), GQA expansion, parameter names --
  is the parent's.
* :class:`MoEFeedForward`: Qwen3-MoE / Mixtral routing (softmax over all experts, top-k,
  optional renormalisation). torchtune 0.6.1 ships no Mixture-of-Experts module (its
  ``torchtune.modules.moe`` came later, for Llama 4: a sigmoid router and a shared expert,
  other numbers); the experts here are torchtune ``FeedForward`` modules, one per expert, so
  the Hub's per-expert weights and PEFT's adapter names map one to one.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torchtune.modules import MultiHeadAttention

from torchtune_prefopt.models.hf.spec import RopeSpec

__all__ = [
    "HFRotaryEmbedding",
    "MoEFeedForward",
    "PreRopeNormAttention",
    "ScaledEmbedding",
    "SoftcappedOutput",
    "rope_inverse_frequencies",
    "window_mask",
]


def rope_inverse_frequencies(head_dim: int, rope: RopeSpec) -> Tensor:
    """``[head_dim / 2]`` fp32 inverse frequencies of HF's ``rope_type``.

    default: ``inv_freq_i = theta^(-2i / d)``; linear: ``inv_freq / factor``; llama3 (Llama
    3.1+): wavelengths ``2 pi / inv_freq`` longer than ``L / low_freq_factor`` are divided by
    ``factor``, shorter than ``L / high_freq_factor`` kept, and in between interpolated with
    ``s = (L / wavelen - low) / (high - low)``: ``(1 - s) inv_freq / factor + s inv_freq``
    (``L`` = ``original_max_position_embeddings``).
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponent)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class HFRotaryEmbedding(nn.Module):
    """Rotary embeddings, HF layout: ``x * cos + rotate_half(x) * sin`` with
    ``rotate_half([x1, x2]) = [-x2, x1]`` (halves of the head dimension).

    Args:
        head_dim: ``d``, the head dimension (the first ``d * rope.partial`` are rotated).
        max_seq_len: positions cached (``[max_seq_len, 2d]`` fp32 cos/sin, not saved).
        rope: frequencies (:func:`rope_inverse_frequencies`).

    ``forward(x [b, s, n_h, d], input_pos [b, s] or None) -> [b, s, n_h, d]``; ``input_pos``
    are the positions of packed rows (each document from 0).
    """

    def __init__(self, head_dim: int, max_seq_len: int, rope: RopeSpec) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.rope = head_dim, max_seq_len, rope
        # Phi-3/4 rotate the first int(head_dim * partial_rotary_factor) dimensions only
        self.rotary_dim = int(head_dim * rope.partial)
        self.rope_init()

    def rope_init(self) -> None:
        """(Re)build the cache: on the meta device at build time, on the real one after
        sharding (:func:`torchtune_prefopt.models.build.init_rope` calls this)."""
        inv_freq = rope_inverse_frequencies(self.rotary_dim, self.rope)
        positions = torch.arange(self.max_seq_len, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # == HF's fp32 outer product
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cache", torch.cat([emb.cos(), emb.sin()], dim=-1), persistent=False)

    def forward(self, x: Tensor, *, input_pos: Optional[Tensor] = None) -> Tensor:
        seq_len, d = x.size(1), self.rotary_dim
        cache = self.cache[:seq_len] if input_pos is None else self.cache[input_pos]
        cache = cache.view(-1, seq_len, 1, 2 * d)
        cos, sin = cache[..., :d].to(x.dtype), cache[..., d:].to(x.dtype)
        rot, rest = (x, None) if d == x.size(-1) else (x[..., :d], x[..., d:])
        x1, x2 = rot[..., : d // 2], rot[..., d // 2 :]
        out = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
        return out if rest is None else torch.cat((out, rest), dim=-1)


def window_mask(q_pos: Tensor, k_pos: Tensor, window: int) -> Tensor:
    """``[..., s_q, s_k]`` bool: key ``j`` is inside query ``i``'s sliding window
    (:func:`~torchtune_prefopt.modules.packed_attention.window_rule`, the one rule:
    ``transformers``' ``sliding_window`` is the query and the ``window - 1`` positions before
    it)."""
    from torchtune_prefopt.modules.packed_attention import window_rule

    return window_rule(q_pos[..., :, None], k_pos[..., None, :], window)


class PreRopeNormAttention(MultiHeadAttention):
    """``MultiHeadAttention`` with ``q_norm`` / ``k_norm`` applied per head *before* RoPE
    (Qwen3, Gemma 3). Self-attention; the KV cache (generation) holds the normed, rotated
    keys, as ``MultiHeadAttention``'s does.

    Gemma 3 also sets ``q_scale`` (queries times ``sqrt(head_dim / query_pre_attn_scalar)``
    after RoPE, so SDPA's ``1 / sqrt(head_dim)`` gives ``q.k / sqrt(query_pre_attn_scalar)``)
    and, on its sliding layers, ``sliding_window``: the padded layout's causal mask, a KV
    cache's mask (by ``input_pos``) and the packed layout's per-document masks
    (:mod:`~torchtune_prefopt.modules.packed_attention` reads this attribute) are cut to the
    window. torchtune 0.6.1's ``Gemma2Attention`` computes ``[s, s]`` scores eagerly, takes
    only dense masks and cuts its window by matrix index (wrong for a KV cache and for packed
    rows), so it is not used."""

    q_scale: float = 1.0
    sliding_window: Optional[int] = None
    #: Gemma 2: scores soft-capped before the mask and softmax, ``cap * tanh(s / cap)``
    softcap: Optional[float] = None

    def forward(
        self,
        x: Tensor,
        y: Optional[Tensor] = None,
        *,
        mask=None,
        input_pos: Optional[Tensor] = None,
    ) -> Tensor:
        y = x if y is None else y
        b, s_x, _ = x.shape
        s_y = y.shape[1]
        q = self.q_proj(x).view(b, s_x, self.num_heads, self.head_dim)
        k = self.k_proj(y).view(b, s_y, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Gemma 2 has none
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(y).view(b, s_y, self.num_kv_heads, self.head_dim)
        if self.pos_embeddings is not None:
            q = self.pos_embeddings(q, input_pos=input_pos)
            k = self.pos_embeddings(k, input_pos=input_pos)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cached = self.kv_cache is not None and self.cache_enabled
        windowed = self.sliding_window is not None and (mask is None or isinstance(mask, Tensor))
        q_slots = None
        if cached:  # [b, n_kv, cache_len, d]; the decoder's mask covers the cache
            if windowed:  # where these queries' keys go (update advances cache_pos in place)
                q_slots = self.kv_cache.cache_pos[:s_x].clone()
            k, v = self.kv_cache.update(k, v)
        if windowed:
            # the window by slot index: a row's real tokens are contiguous (right-padded
            # training rows, left-padded generation prompts), so index distance is position
            # distance, also where position ids are shifted by left padding (packed rows
            # bring their own rule)
            if q_slots is None:
                q_slots = torch.arange(s_x, device=x.device)
            k_slots = torch.arange(k.shape[2], device=x.device)
            inside = window_mask(q_slots, k_slots, self.sliding_window)
            mask = inside.expand(b, s_x, k.shape[2]) if mask is None else mask & inside
        if self.num_heads != self.num_kv_heads:
            expand = (b, self.num_kv_heads, self.num_heads // self.num_kv_heads, -1, self.head_dim)
            k = k.unsqueeze(2).expand(expand).flatten(1, 2)
            v = v.unsqueeze(2).expand(expand).flatten(1, 2)
        if self.softcap is not None and (mask is None or isinstance(mask, Tensor)):
            from torchtune_prefopt.modules.packed_attention import softcapped_attention

            out = softcapped_attention(q, k, v, mask, self.softcap)
        else:  # SDPA, or a packed mask (the patched call knows this layer's window and cap)
            out = self._attention_call(
                q,
                k,
                v,
                mask=mask,
                dropout_p=self.attn_dropout if self.training else 0.0,
                is_causal=not cached and mask is None and self.is_causal,
            )
        return self.output_proj(out.transpose(1, 2).contiguous().view(b, s_x, -1))


class MoEFeedForward(nn.Module):
    """A Mixture-of-Experts MLP with ``transformers``' routing (Qwen3-MoE, Mixtral).

    ``x [b, s, d]`` -> ``[b, s, d]``. Per token ``t``: router logits ``z_t = W_r x_t``
    (``[E]``), probabilities ``p_t = softmax(z_t)`` in fp32, the ``top_k`` largest
    ``p_{t,e}`` (renormalised to sum 1 when ``norm_topk_prob``) weight the chosen experts'
    outputs: ``y_t = sum_{e in topk(t)} w_{t,e} expert_e(x_t)``, each expert torchtune's
    SwiGLU ``FeedForward`` (``w2(silu(w1 x) * w3 x)``, HF's gate/down/up projections).

    The compute is batched per expert: token slots are sorted by expert once and every expert
    runs one matmul over its tokens (an expert with no token runs on an empty batch, so every
    parameter has a gradient, as FSDP2 needs), then the weighted outputs are added back with
    ``index_add_``, in expert order as ``transformers`` does.

    ``router_logits`` (``[b * s, E]``, the last forward's) is kept when
    ``keep_router_logits`` is set (the router load-balancing term reads it).
    """

    def __init__(
        self,
        router: nn.Module,
        experts: nn.ModuleList,
        top_k: int,
        norm_topk_prob: bool,
        fp32_weights: bool,
    ) -> None:
        super().__init__()
        self.router, self.experts = router, experts
        self.top_k, self.norm_topk_prob, self.fp32_weights = top_k, norm_topk_prob, fp32_weights
        self.keep_router_logits = False
        self.router_logits: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        flat = x.reshape(-1, d)
        logits = self.router(flat)
        self.router_logits = logits if self.keep_router_logits else None
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.fp32_weights:
            weights = weights.to(logits.dtype)
        slots = chosen.reshape(-1)
        order = torch.argsort(slots, stable=True)
        counts = torch.bincount(slots, minlength=len(self.experts)).tolist()
        token_of, weight_of = order // self.top_k, weights.reshape(-1)[order]
        out = torch.zeros_like(flat)
        start = 0
        for expert, n in zip(self.experts, counts):
            idx = token_of[start : start + n]
            y = expert(flat[idx]) * weight_of[start : start + n, None]
            out.index_add_(0, idx, y.to(out.dtype))
            start += n
        return out.view(b, s, d)


class ScaledEmbedding(nn.Embedding):
    """Gemma's embedding: the row times ``sqrt(hidden_size)`` rounded to the weight's dtype
    (``transformers``' ``Gemma3TextScaledWordEmbedding``). The parameter is the plain
    ``weight``, so a tied output projection uses the unscaled rows."""

    def forward(self, input: Tensor) -> Tensor:
        scale = torch.tensor(self.embedding_dim**0.5, dtype=self.weight.dtype)
        return super().forward(input) * scale.to(self.weight.device)


class SoftcappedOutput(nn.Module):
    """Gemma 2's output projection: ``cap * tanh(logits / cap)`` (``final_logit_softcapping``)
    after the projection ``proj`` (torchtune's ``TiedLinear``: Gemma ties its head, so no
    parameter is added). The lean log-prob path projects through it chunk by chunk."""

    def __init__(self, proj: Any, cap: float) -> None:
        super().__init__()
        self.proj, self.cap = proj, cap

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(self.proj(h) / self.cap) * self.cap
