"""Attention over packed preference rows: documents side by side, prompts shared in a tree.

A packed row ``[R, L]`` holds several *documents* one after the other, then padding. A document
is one sequence, or two sequences that share their common prefix (prompt sharing):

    tokens   [ p_0 ... p_{k-1} | a_k ... a_{n-1} | b_k ... b_{m-1} ]
    branch     0 ...       0   | 1 ...       1   | 2 ...       2
    position   0 ...     k-1   | k ...     n-1   | k ...     m-1

Query ``q`` attends key ``j`` iff both are in the same document, ``j <= q`` in the row, and not
(``q`` in branch 2 and ``j`` in branch 1). So ``b`` sees exactly ``p`` then itself, at the
positions it has in its own padded row: its hidden states equal the padded ones up to fp32
rounding, and the prompt is computed once.

:class:`PackedAttention` is passed as the ``mask`` of a torchtune ``TransformerDecoder``;
:func:`enable_packed_attention` (applied by the packed batch on first use) overrides each
``MultiHeadAttention``'s ``_attention_call`` *instance attribute* so that, given that mask, it
computes

* on CUDA: ``flex_attention`` with a ``BlockMask`` of the rule above (block-sparse: fully
  masked 128x128 blocks are skipped), compiled once like torchtune's own packed SFT;
* elsewhere (CPU): one ``scaled_dot_product_attention`` per document -- causal for a plain
  document, a small ``[d, d]`` tree mask for a shared one -- so no ``[L, L]`` mask exists and
  no score between two documents is computed.

Any other mask (``None``, a tensor, a ``BlockMask``) goes to the layer's original call.

A layer with a ``sliding_window`` attribute (Gemma 2/3's local layers) also needs ``0 <=
pos_q - pos_j < window`` on the positions within the sequence, so a window is exact inside a
document and, for a shared prompt, on the second branch's own positions. A layer with a
``softcap`` (Gemma 2) computes its per-document scores itself (``cap * tanh(s / cap)``) and
on CUDA passes the cap to ``flex_attention`` as its ``score_mod``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PackedAttention",
    "enable_packed_attention",
    "softcapped_attention",
    "tree_mask_rule",
    "window_rule",
]

#: branch ids of the packed layout (see the module docstring)
SHARED, FIRST, SECOND = 0, 1, 2

_ENABLED = "_prefopt_packed_attention"


def softcapped_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], cap: float
) -> Tensor:
    """Attention with Gemma 2's soft-capped scores (``transformers``' eager path): ``s = q.k /
    sqrt(d)`` (``q`` already carries the query scale), ``s = cap * tanh(s / cap)``, masked,
    softmax in fp32. ``q`` ``[b, h, s_q, d]``, ``k``/``v`` ``[b, h, s_k, d]``, ``mask``
    ``[b, s_q, s_k]`` or ``[s_q, s_k]`` bool (True: attend) or ``None`` (causal)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = torch.tanh(scores / cap) * cap
    if mask is None:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask.dim() == 3:
        mask = mask[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


def window_rule(pos_q: Tensor, pos_k: Tensor, window: int):
    """Key inside the query's sliding window: ``0 <= pos_q - pos_k < window`` (positions
    within the sequence; elementwise, broadcasts)."""
    return (pos_q - pos_k >= 0) & (pos_q - pos_k < window)


def tree_mask_rule(
    doc_q: Tensor, doc_k: Tensor, branch_q: Tensor, branch_k: Tensor, causal: Tensor
):
    """The packed attention rule, elementwise (broadcasts): same document, causal in the row,
    and the second branch never sees the first."""
    return (doc_q == doc_k) & causal & ~((branch_q == SECOND) & (branch_k == FIRST))


class PackedAttention:
    """The attention mask of packed rows (not a tensor: the ``mask`` argument of a
    ``TransformerDecoder`` whose attention layers :func:`enable_packed_attention` has patched).

    Args:
        doc: ``[R, L]`` int64 document id of each position (unique over the batch; ``-1`` on
            row padding).
        branch: ``[R, L]`` int64 branch of each position (``0`` shared/plain, ``1`` first
            sequence of a shared document, ``2`` second).
        spans: ``[n_docs, 4]`` int64 ``(row, start, end, shared)`` of every document.
        block_sparse: use ``flex_attention`` with a ``BlockMask`` (default: on CUDA).
        positions: ``[R, L]`` int64 position of each token within its own sequence (the
            batch's ``input_pos``); needed by sliding-window layers only.
    """

    def __init__(
        self,
        doc: Tensor,
        branch: Tensor,
        spans: Tensor,
        block_sparse: Optional[bool] = None,
        positions: Optional[Tensor] = None,
    ) -> None:
        self.doc = doc
        self.branch = branch
        self.positions = positions
        self.spans: List[Tuple[int, int, int, bool]] = [
            (int(r), int(s), int(e), bool(sh)) for r, s, e, sh in spans.tolist()
        ]
        if block_sparse is None:
            block_sparse = doc.is_cuda
        self.block_sparse = block_sparse
        self._tree_masks: dict = {}
        self._block_mask = None

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.doc.shape)

    # -- CPU / fallback: one SDPA per document
    def _tree_mask(self, row: int, start: int, end: int, window: Optional[int] = None) -> Tensor:
        key = (row, start, window)
        if key not in self._tree_masks:
            b = self.branch[row, start:end]
            d = end - start
            causal = torch.ones(d, d, dtype=torch.bool, device=b.device).tril()
            same = torch.zeros(d, dtype=self.doc.dtype, device=b.device)
            rule = tree_mask_rule(same[:, None], same[None, :], b[:, None], b[None, :], causal)
            if window is not None:
                pos = self._window_positions()[row, start:end]
                rule = rule & window_rule(pos[:, None], pos[None, :], window)
            self._tree_masks[key] = rule
        return self._tree_masks[key]

    def _window_positions(self) -> Tensor:
        if self.positions is None:
            raise ValueError("a sliding-window layer needs the packed rows' positions")
        return self.positions

    def per_document(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        window: Optional[int] = None,
        softcap: Optional[float] = None,
    ) -> Tensor:
        """``[R, H, L, hd]`` attention output, document by document (padding gets zeros)."""
        rows, heads, length, head_dim = q.shape
        out: List[List[Tensor]] = [[] for _ in range(rows)]
        filled = [0] * rows
        for row, start, end, shared in self.spans:
            if start > filled[row]:
                out[row].append(q.new_zeros(heads, start - filled[row], head_dim))
            # [1, H, d, hd]: SDPA takes its fused CPU (flash) kernel only for 4-D inputs; a
            # 3-D [H, d, hd] slice falls back to the math path, which materialises [H, d, d]
            # scores and their softmax for backward
            rows_ = slice(row, row + 1)
            qd, kd, vd = (t[rows_, :, start:end] for t in (q, k, v))
            if softcap is not None:  # soft-capped scores: no fused kernel takes them
                o = softcapped_attention(
                    qd, kd, vd, self._tree_mask(row, start, end, window), softcap
                )
            elif shared or window is not None:
                o = F.scaled_dot_product_attention(
                    qd, kd, vd, attn_mask=self._tree_mask(row, start, end, window)
                )
            else:
                o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
            out[row].append(o[0])
            filled[row] = end
        for row in range(rows):
            if filled[row] < length:
                out[row].append(q.new_zeros(heads, length - filled[row], head_dim))
        return torch.stack([torch.cat(parts, dim=1) for parts in out])

    # -- CUDA: flex_attention with a block mask
    def block_mask(self, window: Optional[int] = None):
        if self._block_mask is None:
            self._block_mask = {}
        if window not in self._block_mask:
            from torch.nn.attention.flex_attention import create_block_mask

            doc, branch = self.doc, self.branch
            pos = self._window_positions() if window is not None else None

            def mask_mod(b, h, q_idx, kv_idx):
                rule = tree_mask_rule(
                    doc[b, q_idx], doc[b, kv_idx], branch[b, q_idx], branch[b, kv_idx],
                    kv_idx <= q_idx,
                )  # fmt: skip
                if window is None:
                    return rule
                return rule & window_rule(pos[b, q_idx], pos[b, kv_idx], window)

            rows, length = doc.shape
            self._block_mask[window] = create_block_mask(
                mask_mod, rows, None, length, length, device=doc.device
            )
        return self._block_mask[window]


def _flex_attention() -> Callable:
    # torchtune's compiled flex_attention (compiled once per process, as its packed SFT does)
    from torchtune.modules.attention_utils import compile_friendly_flex_attention

    return compile_friendly_flex_attention


class _PackedAttentionCall:
    """Replacement ``MultiHeadAttention._attention_call``: packed masks here, anything else to
    the layer's original call. A callable object (not a closure) so models still deep-copy.
    ``window``: the layer's ``sliding_window`` (``None``: full attention)."""

    def __init__(
        self, previous: Callable, window: Optional[int] = None, softcap: Optional[float] = None
    ) -> None:
        self.previous = previous
        self.window = window
        self.softcap = softcap

    def __call__(self, q, k, v, mask: Any = None, dropout_p: float = 0.0, is_causal: bool = False):
        if not isinstance(mask, PackedAttention):
            return self.previous(q, k, v, mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        if dropout_p > 0.0:
            raise ValueError("packed attention does not support attention dropout")
        if mask.block_sparse:
            if self.softcap is not None:
                return _flex_softcapped(q, k, v, mask.block_mask(self.window), self.softcap)
            return _flex_attention()(q, k, v, block_mask=mask.block_mask(self.window))
        return _per_document(mask, q, k, v, self.window, self.softcap)


@functools.lru_cache(maxsize=None)
def _compiled_flex() -> Callable:
    """``flex_attention`` compiled once per process (not once per call)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex_softcapped(q: Tensor, k: Tensor, v: Tensor, block_mask, cap: float) -> Tensor:
    """``flex_attention`` with Gemma 2's ``cap * tanh(score / cap)`` as its score_mod."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask)


@torch.compiler.disable
def _per_document(
    mask: PackedAttention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: Optional[int],
    softcap: Optional[float],
) -> Tensor:
    # a python loop over documents: compiled layers break the graph here (the projections
    # and MLP around it stay compiled); the document count varies from batch to batch
    return mask.per_document(q, k, v, window, softcap)


def enable_packed_attention(model: nn.Module) -> nn.Module:
    """Let every torchtune ``MultiHeadAttention`` of ``model`` take a :class:`PackedAttention`
    mask (idempotent; instance attributes only, so ``state_dict`` is unchanged and FSDP2,
    activation checkpointing and compiled layers keep working). Returns ``model``."""
    from torchtune.modules.attention import MultiHeadAttention

    for m in model.modules():
        if isinstance(m, MultiHeadAttention) and not m.__dict__.get(_ENABLED, False):
            m._attention_call = _PackedAttentionCall(
                m._attention_call,
                getattr(m, "sliding_window", None),
                getattr(m, "softcap", None),
            )
            m.__dict__[_ENABLED] = True
    return model
