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
3. saves nothing of the chunk for backward but its inputs: the chunk is recomputed during
   backward (non-reentrant :func:`torch.utils.checkpoint.checkpoint`), and the backward of
   the log-softmax/gather is a fused ``onehot - softmax`` written in place, so peak memory is
   ``O(chunk_size * V)`` instead of ``O(B * S * V)``;
4. scatter-adds the per-token log-probs into per-sequence sums (``index_add``).

Gradients flow to ``hidden`` and to everything ``output_proj`` uses (an ``nn.Linear``
weight, a LoRA adapter on the output layer, tied embeddings via torchtune's ``TiedLinear``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

__all__ = ["SequenceLogProbs", "sequence_logprobs", "check_label_rows"]

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
        chunk_size: number of label tokens projected at once; peak extra memory is about
            ``chunk_size * V * 8`` bytes (fp32 logits + their gradient).
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
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    proj = _as_callable(output_proj)

    num_tokens = check_label_rows(labels, ignore_index)
    batch = hidden.shape[0]

    # shift: hidden[:, t] predicts labels[:, t + 1]
    targets = labels[:, 1:]
    keep = targets != ignore_index  # [B, S-1]
    rows = keep.nonzero()[:, 0]  # [N] row of each selected token (row-major order)
    h_sel = hidden[:, :-1][keep]  # [N, D]  only labelled positions are ever projected
    t_sel = targets[keep].long()  # [N]
    if bool((t_sel < 0).any()):
        raise ValueError(
            f"labels contain negative values other than ignore_index={ignore_index}"
        )

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
    per_token = pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    total = per_token.new_zeros(batch).index_add(0, rows, per_token)
    mean = total / num_tokens.to(total.dtype)
    return SequenceLogProbs(sum=total, mean=mean, num_tokens=num_tokens)
