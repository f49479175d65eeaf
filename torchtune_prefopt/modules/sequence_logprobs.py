"""Memory-lean per-sequence log-probs: never materialises ``[batch, seq, vocab]`` logits.

Preference losses (DPO, IPO, SimPO, KTO) only need, per sequence, the summed (or mean)
log-probability of the completion tokens. The usual path

    logits = model(tokens)                      # [B, S, V]  (V = 128256 for Llama 3)
    rlhf.get_batch_log_probs(logits, labels)    # fp32 log_softmax over [B, S, V] + gather

holds several ``[B, S, V]`` fp32 tensors alive for backward. :func:`sequence_logprobs`
instead

1. shifts (position ``t`` predicts ``labels[t + 1]``) and keeps only the positions that
   have a label, so prompt and padding positions are never projected onto the vocabulary;
2. walks the selected tokens in chunks of ``chunk_size``; per chunk it projects to logits,
   upcasts to fp32 (even for a bf16 model), and takes ``target_logit - logsumexp``;
3. saves nothing vocabulary-sized for backward: the chunk's logits are recomputed during
   backward and the log-softmax/gather backward is ``onehot - softmax`` written in place, so
   peak memory is ``O(chunk_size * V)`` instead of ``O(B * S * V)``;
4. scatter-adds the per-token log-probs into per-sequence sums (``index_add``).

Two backward paths give the same numbers:

* **fused** (a weight tensor, a hook-free ``nn.Linear``, torchtune's ``TiedLinear``): one
  ``autograd.Function`` over all chunks; backward recomputes each chunk's logits and
  accumulates the weight gradient in place (``addmm_``) into a single ``[V, D]`` buffer.
* **generic** (any other callable, e.g. a LoRA output layer, an FSDP-wrapped output module, a
  module with hooks such as torchtune's activation-offloading ``NoOpManager``): each chunk is
  a non-reentrant :func:`torch.utils.checkpoint.checkpoint` region calling ``output_proj``
  again in backward. Autograd sums the per-chunk weight gradients, so with more than one
  chunk it briefly holds two ``[V, D]`` gradient buffers.

Gradients flow to ``hidden`` and to everything ``output_proj`` uses (an ``nn.Linear``
weight, a LoRA adapter on the output layer, tied embeddings via torchtune's ``TiedLinear``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

__all__ = [
    "SequenceLogProbs",
    "TokenSelection",
    "check_label_rows",
    "selected_logprobs",
    "sequence_logprobs",
]

OutputProj = Union[Callable[[Tensor], Tensor], Tensor]


@dataclass
class SequenceLogProbs:
    """Per-sequence log-probabilities of the label tokens.

    Attributes:
        sum: ``[B]`` summed log-prob of the label tokens (fp32; fp64 if the inputs are fp64).
        mean: ``[B]`` ``sum / num_tokens``, same dtype as ``sum``.
        num_tokens: ``[B]`` int64 number of label tokens per row (always >= 1).
    """

    sum: Tensor
    mean: Tensor
    num_tokens: Tensor

    def __len__(self) -> int:
        return int(self.sum.shape[0])

    def __getitem__(self, rows) -> "SequenceLogProbs":
        """The same rows (an index, slice or index tensor) of every field."""
        return SequenceLogProbs(
            sum=self.sum[rows], mean=self.mean[rows], num_tokens=self.num_tokens[rows]
        )

    def halves(self) -> Tuple["SequenceLogProbs", "SequenceLogProbs"]:
        """``[2B] -> ([B], [B])``: the batch layout's first sequences (chosen; KTO rows) and
        second ones (rejected; KTO's KL rows). The inverse of :meth:`cat`."""
        b = len(self) // 2
        return self[:b], self[b:]

    @staticmethod
    def cat(first: "SequenceLogProbs", second: "SequenceLogProbs") -> "SequenceLogProbs":
        """``([B], [B]) -> [2B]`` (the inverse of :meth:`halves`)."""
        return SequenceLogProbs(
            sum=torch.cat([first.sum, second.sum]),
            mean=torch.cat([first.mean, second.mean]),
            num_tokens=torch.cat([first.num_tokens, second.num_tokens]),
        )

    def detach(self) -> "SequenceLogProbs":
        return SequenceLogProbs(self.sum.detach(), self.mean.detach(), self.num_tokens)

    def form(self, average: bool) -> Tensor:
        """The log-prob form a loss takes: per-token ``mean`` (``average``) or ``sum``."""
        return self.mean if average else self.sum


def check_label_rows(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Return the per-row label-token counts of *unshifted* ``labels`` ``[B, S]`` (int64).

    Raises:
        ValueError: if a row has no label token after the shift (``labels[:, 1:]``), naming
            the row indices: ``empty completion: rows [3] have no label tokens``.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq], got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    num_tokens = (labels[:, 1:] != ignore_index).sum(dim=1, dtype=torch.int64)
    empty = num_tokens == 0
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"empty completion: rows {rows} have no label tokens "
            f"(every labels[:, 1:] entry of those rows is ignore_index={ignore_index})"
        )
    return num_tokens


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 at least (bf16/fp16 logits are upcast); fp64 stays fp64 (gradcheck).
    return torch.promote_types(dtype, torch.float32)


class _TargetLogProb(torch.autograd.Function):
    """``log_softmax(logits.float())[i, target[i]]`` for 2-D ``logits`` ``[N, V]``.

    Forward keeps only ``logits`` (in their own dtype) and the ``[N]`` logsumexp. Backward
    writes ``grad * (onehot(target) - softmax)`` into a single fresh ``[N, V]`` buffer.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        x = logits.to(_compute_dtype(logits.dtype))
        lse = torch.logsumexp(x, dim=-1)
        picked = x.gather(1, target.unsqueeze(1)).squeeze(1)
        ctx.save_for_backward(logits, target, lse)
        return picked - lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        logits, target, lse = ctx.saved_tensors
        # one [N, V] buffer in the compute dtype, everything else in place
        g = logits.to(_compute_dtype(logits.dtype), copy=True)
        g.sub_(lse.unsqueeze(1)).exp_()  # softmax
        g.mul_(grad.neg().unsqueeze(1))
        g.scatter_add_(1, target.unsqueeze(1), grad.unsqueeze(1).to(g.dtype))
        return g.to(logits.dtype), None


def _no_module_hooks(m: nn.Module) -> bool:
    from torch.nn.modules import module as _m

    return not (
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or m._backward_pre_hooks
        or _m._global_forward_hooks
        or _m._global_forward_pre_hooks
        or _m._global_backward_hooks
        or _m._global_backward_pre_hooks
    )


def _plain_linear(output_proj: OutputProj) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
    """``(weight, bias)`` if calling ``output_proj`` is exactly ``F.linear(x, weight, bias)``
    with plain (non-DTensor, non-FSDP-managed) tensors; else ``None`` (generic path)."""
    if isinstance(output_proj, Tensor):
        weight, bias = output_proj, None
    elif isinstance(output_proj, nn.Linear):
        if type(output_proj).forward is not nn.Linear.forward or not _no_module_hooks(output_proj):
            return None
        weight, bias = output_proj.weight, output_proj.bias
    elif _is_tied_linear(output_proj):
        if not _no_module_hooks(output_proj.linear) or _is_fsdp(output_proj.tied_module):
            return None
        weight, bias = output_proj.tied_module.weight, None
    else:
        return None
    if _is_dtensor(weight) or (bias is not None and _is_dtensor(bias)):
        return None
    return weight, bias


def _is_tied_linear(obj) -> bool:
    # no torchtune import here: if torchtune's TiedLinear was never imported, obj isn't one
    mod = sys.modules.get("torchtune.modules.tied_linear")
    return mod is not None and isinstance(obj, mod.TiedLinear)


def _is_fsdp(m: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(m, FSDPModule)


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


class _FusedLinearTargetLogProb(torch.autograd.Function):
    """Per-token ``log_softmax(F.linear(h, W, b).float())[target]`` over chunks of ``h``.

    Saves only ``h``, ``W``, ``b`` (references, no copies), ``target`` and the ``[N]``
    logsumexp. Backward recomputes each chunk's logits and writes ``grad_h`` chunk by chunk
    and ``grad_W``/``grad_b`` in place, so at most one chunk of logits/gradient is alive.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, target, chunk_size):  # type: ignore[override]
        n = h.shape[0]
        cdt = _compute_dtype(weight.dtype)
        out = torch.empty(n, dtype=cdt, device=h.device)
        lse = torch.empty(n, dtype=cdt, device=h.device)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            x = F.linear(h[s:e], weight, bias).to(cdt)  # own buffer: modified in place below
            picked = x.gather(1, target[s:e].unsqueeze(1)).squeeze(1)
            m = x.amax(dim=1, keepdim=True)
            x.sub_(m).exp_()
            lse_c = x.sum(dim=1).log_().add_(m.squeeze(1))
            lse[s:e] = lse_c
            out[s:e] = picked - lse_c
            del x
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(h, weight, bias, target, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        h, weight, bias, target, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, cs = h.shape[0], ctx.chunk_size
        cdt = lse.dtype
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=cdt, device=bias.device) if need_b else None
        for s in range(0, n, cs):
            e = min(s + cs, n)
            g_out = grad[s:e].to(cdt)
            # softmax, then grad * (onehot - softmax), in one [c, V] compute-dtype buffer
            g = F.linear(h[s:e], weight, bias).to(cdt)
            g.sub_(lse[s:e].unsqueeze(1)).exp_().mul_(g_out.neg().unsqueeze(1))
            g.scatter_add_(1, target[s:e].unsqueeze(1), g_out.unsqueeze(1))
            if need_b:
                grad_b += g.sum(dim=0)
            g = g.to(weight.dtype)
            if need_h:
                torch.mm(g, weight, out=grad_h[s:e])
            if need_w:
                grad_w.addmm_(g.t(), h[s:e])
            del g
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None


def _as_callable(output_proj: OutputProj) -> Callable[[Tensor], Tensor]:
    if isinstance(output_proj, Tensor):
        if output_proj.dim() != 2:
            raise ValueError(
                "output_proj given as a tensor must be a [vocab, dim] weight, "
                f"got shape {tuple(output_proj.shape)}"
            )
        weight = output_proj
        return lambda x: F.linear(x, weight)
    if not callable(output_proj):
        raise TypeError(
            "output_proj must be a callable [N, D] -> [N, V] (nn.Linear, TiedLinear, ...) "
            f"or a [V, D] weight tensor, got {type(output_proj).__name__}"
        )
    return output_proj


def _chunk_logprobs(proj: Callable[[Tensor], Tensor], h: Tensor, target: Tensor) -> Tensor:
    logits = proj(h)
    if logits.dim() != 2 or logits.shape[0] != h.shape[0]:
        raise ValueError(
            f"output_proj must map [N, D] -> [N, V]; got {tuple(h.shape)} -> {tuple(logits.shape)}"
        )
    return _TargetLogProb.apply(logits, target)


@dataclass
class TokenSelection:
    """Which hidden states score which tokens, for which sequence: the one description of
    "what to score" shared by the padded and the packed layouts.

    Attributes:
        positions: ``[N]`` int64 flat positions into ``hidden.reshape(-1, D)`` (row-major over
            ``[R, L]``): the hidden state that predicts each scored token.
        targets: ``[N]`` int64 token ids scored there.
        slots: ``[N]`` int64 sequence (slot) each scored token belongs to, ``0..num_slots-1``.
        num_tokens: ``[num_slots]`` int64 scored tokens per slot (all >= 1).

    A position may appear more than once (a shared prompt position predicts the first
    token of both completions). Tokens of one slot are listed in sequence order, slots in
    increasing order, so per-slot sums add in the same order in every layout.
    """

    positions: Tensor
    targets: Tensor
    slots: Tensor
    num_tokens: Tensor

    @property
    def num_slots(self) -> int:
        return int(self.num_tokens.shape[0])

    def to(self, device) -> "TokenSelection":
        return TokenSelection(
            self.positions.to(device),
            self.targets.to(device),
            self.slots.to(device),
            self.num_tokens.to(device),
        )

    @classmethod
    def from_labels(cls, labels: Tensor, ignore_index: int = -100) -> "TokenSelection":
        """The selection of right-padded *unshifted* ``labels`` ``[B, S]``: position ``t`` of row
        ``b`` scores ``labels[b, t + 1]`` for every label that is not ``ignore_index``.

        Raises:
            ValueError: as :func:`check_label_rows`, or on negative labels.
        """
        num_tokens = check_label_rows(labels, ignore_index)
        seq = labels.shape[1]
        targets = labels[:, 1:]
        keep = targets != ignore_index  # [B, S-1]
        rows, cols = keep.nonzero(as_tuple=True)  # row-major: slot by slot, in sequence order
        t_sel = targets[keep].long()
        if bool((t_sel < 0).any()):
            raise ValueError(
                f"labels contain negative values other than ignore_index={ignore_index}"
            )
        return cls(positions=rows * seq + cols, targets=t_sel, slots=rows, num_tokens=num_tokens)


def sequence_logprobs(
    hidden: Tensor,
    output_proj: OutputProj,
    labels: Tensor,
    *,
    chunk_size: int = 1024,
    ignore_index: int = -100,
) -> SequenceLogProbs:
    """Per-sequence log-probs of ``labels`` without building ``[B, S, V]`` logits.

    Numerically this is ``rlhf.get_batch_log_probs(output_proj(hidden).float(), labels)``
    (sum, and the mean with ``return_average_logprobs=True``).

    Args:
        hidden: ``[B, S, D]`` final hidden states (after the final norm), any float dtype.
        output_proj: callable ``[N, D] -> [N, V]`` (``nn.Linear``, LoRA linear, torchtune's
            ``TiedLinear``) or a ``[V, D]`` weight tensor.
        labels: ``[B, S]`` *unshifted* labels: position ``t`` predicts ``labels[:, t + 1]``;
            ``ignore_index`` marks prompt and padding tokens.
        chunk_size: number of label tokens projected at once. Peak extra memory is about one
            fp32 ``[chunk_size, V]`` buffer (plus the low-precision logits for a bf16 model) on
            the fused path, about two on the generic path.
        ignore_index: label value that is not scored.

    Returns:
        :class:`SequenceLogProbs` with ``sum``/``mean`` in fp32 (fp64 for fp64 inputs) and
        ``num_tokens`` in int64.

    Raises:
        ValueError: on bad shapes, ``chunk_size < 1``, negative labels other than
            ``ignore_index``, or a row with no label token (``empty completion: rows [i]``).
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [batch, seq, dim], got shape {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match hidden's [batch, seq] {tuple(hidden.shape[:2])}"
        )
    selection = TokenSelection.from_labels(labels, ignore_index)
    return selected_logprobs(hidden, output_proj, selection, chunk_size=chunk_size)


def selected_logprobs(
    hidden: Tensor,
    output_proj: OutputProj,
    selection: TokenSelection,
    *,
    chunk_size: int = 1024,
) -> SequenceLogProbs:
    """Per-slot log-probs of the tokens ``selection`` names (see :class:`TokenSelection`).

    ``hidden`` is ``[R, L, D]`` (padded rows or packed rows); only the ``N`` selected positions
    are projected onto the vocabulary. Returns ``[num_slots]`` sums/means (fp32, fp64 for fp64
    inputs) and token counts.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    linear = _plain_linear(output_proj)
    proj = None if linear is not None else _as_callable(output_proj)
    h_sel = hidden.reshape(-1, hidden.shape[-1])[selection.positions]  # [N, D]
    t_sel = selection.targets

    if linear is not None:
        weight, bias = linear
        if weight.dim() != 2 or weight.shape[1] != h_sel.shape[1]:
            raise ValueError(
                f"output weight {tuple(weight.shape)} must be [vocab, {h_sel.shape[1]}]"
            )
        per_token = _FusedLinearTargetLogProb.apply(h_sel, weight, bias, t_sel, chunk_size)
    else:
        per_token = _generic_per_token(proj, h_sel, t_sel, chunk_size)

    num_tokens = selection.num_tokens
    total = per_token.new_zeros(selection.num_slots).index_add(0, selection.slots, per_token)
    mean = total / num_tokens.to(total.dtype)
    return SequenceLogProbs(sum=total, mean=mean, num_tokens=num_tokens)


def _generic_per_token(proj, h_sel: Tensor, t_sel: Tensor, chunk_size: int) -> Tensor:
    recompute = torch.is_grad_enabled()
    pieces = []
    for start in range(0, h_sel.shape[0], chunk_size):
        h_c = h_sel[start : start + chunk_size]
        t_c = t_sel[start : start + chunk_size]
        if recompute:
            # nothing of the chunk but its inputs is kept; recomputed in backward
            lp = checkpoint(_chunk_logprobs, proj, h_c, t_c, use_reentrant=False)
        else:
            lp = _chunk_logprobs(proj, h_c, t_c)
        pieces.append(lp)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
