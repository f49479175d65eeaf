"""Generation helpers for the comparison: chat-template prompts, batched sampling, log-probs.

Prompts are the held-out pairs' prompt tokens exactly as the data pipeline built them with
the tokenizer's chat template (everything before the first label token: the conversation so
far plus the assistant header, e.g. ``<|im_start|>assistant\\n``), so the models are asked in
the format they were trained on. Generation (:func:`generate_completions`) decodes
left-padded batches with the model's KV cache, greedy (``temperature=0``: top-1) or sampled
with a seeded ``torch.Generator``; every model gets the same seed, so sampled comparisons use
common random numbers.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from torchtune_prefopt.data import CROSS_ENTROPY_IGNORE_IDX, decode_text
from torchtune_prefopt.modules import decoder_sequence_logprobs

__all__ = [
    "completion_lengths",
    "decode_completion",
    "completion_logps",
    "generate_completions",
    "prompt_ids",
]


def prompt_ids(item) -> List[int]:
    """The chat-template prompt tokens of a paired item (tokens before the first label)."""
    labels = item["chosen_labels"]
    for i, lab in enumerate(labels):
        if lab != CROSS_ENTROPY_IGNORE_IDX:
            if i == 0:
                raise ValueError(
                    "the held-out dataset puts labels on the prompt (train_on_input=True); "
                    "the comparison needs prompt tokens without labels"
                )
            return list(item["chosen_input_ids"][:i])
    raise ValueError("held-out item has no completion tokens")


def decode_completion(tokenizer, ids: Sequence[int], stop_tokens: Sequence[int] = ()) -> str:
    """Text of generated ``ids`` without stop/special tokens. Ids the tokenizer cannot decode
    (a model vocabulary padded beyond the tokenizer's, sampled from an untrained model)
    become ``<id>``."""
    stop = set(int(t) for t in stop_tokens)
    ids = [int(t) for t in ids if int(t) not in stop]
    try:
        return decode_text(tokenizer, ids)
    except Exception:  # noqa: BLE001 - fall back to token by token
        parts = []
        for t in ids:
            try:
                parts.append(decode_text(tokenizer, [t]))
            except Exception:  # noqa: BLE001
                parts.append(f"<{t}>")
        return "".join(parts)


def _cut_at_stop(tokens: Sequence[int], stop: set) -> List[int]:
    out = []
    for t in tokens:
        out.append(int(t))
        if t in stop:
            break
    return out


def _next_tokens(
    logits: torch.Tensor, *, greedy: bool, temperature: float, top_k: Optional[int], rng
) -> torch.Tensor:
    """``[B]`` tokens from the last position's ``logits`` ``[B, V]``: the argmax, or one exact
    draw from ``softmax(logits / temperature)`` (restricted to the ``top_k`` largest)."""
    if greedy:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(int(top_k), logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


def _decode(
    model: nn.Module,
    batch: torch.Tensor,
    valid: torch.Tensor,
    *,
    max_new_tokens: int,
    stop: torch.Tensor,
    incremental: bool,
    **sampling,
) -> torch.Tensor:
    """``[B, max_new_tokens]`` tokens after the left-padded prompts ``batch`` ``[B, P]``.

    ``valid`` ``[B, P + max_new_tokens]`` marks real positions (the prompt's, from its length,
    never from token ids: a pad id that also occurs in prompts, e.g. ChatML's ``<|im_end|>``
    as SmolLM2's pad token, stays visible) and every generated one. Position ids count real
    tokens from 0; each query sees the real keys up to itself (a pad row only itself). With
    ``incremental`` the model's KV caches hold the past (``[B, 1]`` inputs after the prompt),
    otherwise every step runs the whole sequence. Rows stop mattering after a stop token
    (their later tokens are cut by the caller); the loop ends when every row has one."""
    bsz, width = batch.shape
    total = width + max_new_tokens
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    mask = torch.tril(torch.ones(total, total, dtype=torch.bool, device=batch.device))
    mask = (mask[None] & valid[:, None, :]) | torch.eye(
        total, dtype=torch.bool, device=batch.device
    )
    out = torch.empty(bsz, max_new_tokens, dtype=torch.long, device=batch.device)
    done = torch.zeros(bsz, dtype=torch.bool, device=batch.device)
    # the prefill's keys: the whole cache (incremental) or the prompt itself
    first = mask[:, :width] if incremental else mask[:, :width, :width]
    logits = model(batch, input_pos=positions[:, :width], mask=first)[:, -1]
    for step in range(max_new_tokens):
        out[:, step] = _next_tokens(logits, **sampling)
        done |= torch.isin(out[:, step], stop)
        if step + 1 == max_new_tokens or bool(done.all()):
            return out[:, : step + 1]
        at = width + step  # the position of the token just drawn
        if incremental:
            x, pos, m = out[:, step : step + 1], positions[:, at : at + 1], mask[:, at : at + 1]
        else:
            x = torch.cat([batch, out[:, : step + 1]], dim=1)
            pos, m = positions[:, : at + 1], mask[:, : at + 1, : at + 1]
        logits = model(x, input_pos=pos, mask=m)[:, -1]
    return out


@torch.no_grad()
def generate_completions(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_tokens: Sequence[int],
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    seed: Optional[int] = None,
    batch_size: int = 8,
    kv_cache: bool = True,
) -> List[List[int]]:
    """Generate up to ``max_new_tokens`` per prompt; returns each completion's tokens, cut
    after the first stop token (included when generated).

    ``temperature=0`` is greedy decoding (top-1); otherwise exact samples from
    ``softmax(logits / temperature)`` (optionally top-k) drawn by ``torch.multinomial`` with
    one ``torch.Generator`` seeded with ``seed`` for the whole call. Batches are left-padded
    with ``pad_id``; which positions are padding comes from the prompts' lengths (see
    :func:`_decode`; torchtune's ``generate`` reads it from ``token != pad_id``, which hides
    every prompt token equal to the pad id, and keeps every step's ``[B, V]`` logits).
    Prompts longer than the model's ``max_seq_len - max_new_tokens`` keep their last tokens.
    """
    from torchtune.modules import local_kv_cache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    greedy = temperature is None or float(temperature) <= 0.0
    rng = None
    if not greedy:
        rng = torch.Generator(device=device)
        rng.manual_seed(int(seed) if seed is not None else int(torch.seed()))
    model_max = getattr(model, "max_seq_len", None)
    keep = None if model_max is None else max(1, int(model_max) - max_new_tokens)
    stop_set = set(int(t) for t in stop_tokens)
    stop = torch.tensor(sorted(stop_set), dtype=torch.long, device=device)
    sampling = dict(
        greedy=greedy,
        temperature=1.0 if greedy else float(temperature),
        top_k=None if greedy else top_k,
        rng=rng,
    )
    was_training = model.training
    model.eval()
    results: List[List[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [
                list(p)[-keep:] if keep else list(p) for p in prompts[start : start + batch_size]
            ]
            width = max(len(p) for p in chunk)
            batch = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            valid = torch.ones(len(chunk), width + max_new_tokens, dtype=torch.bool)
            for i, p in enumerate(chunk):
                batch[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                valid[i, : width - len(p)] = False
            batch, valid = batch.to(device), valid.to(device)
            kw = dict(max_new_tokens=max_new_tokens, stop=stop, **sampling)
            if kv_cache and hasattr(model, "setup_caches") and not model.caches_are_setup():
                with local_kv_cache(
                    model,
                    batch_size=len(chunk),
                    device=device,
                    dtype=dtype,
                    decoder_max_seq_len=width + max_new_tokens,
                ):
                    out = _decode(model, batch, valid, incremental=True, **kw)
            else:
                incremental = bool(getattr(model, "caches_are_enabled", lambda: False)())
                out = _decode(model, batch, valid, incremental=incremental, **kw)
            for row in out.tolist():
                results.append(_cut_at_stop(row, stop_set))
    finally:
        model.train(was_training)
    return results


def completion_lengths(
    completions: Sequence[Sequence[int]], stop_tokens: Sequence[int]
) -> Tuple[List[int], List[bool]]:
    """``(lengths, hit_limit)``: tokens per completion without the final stop token, and
    whether the completion ended without one (cut at ``max_new_tokens``)."""
    stop = set(int(t) for t in stop_tokens)
    lengths, hit = [], []
    for c in completions:
        ended = bool(c) and c[-1] in stop
        lengths.append(len(c) - (1 if ended else 0))
        hit.append(not ended)
    return lengths, hit


@torch.no_grad()
def completion_logps(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_id: int,
    device: torch.device,
    batch_size: int = 8,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Summed log-prob (float64, ``[N]``) of each completion given its prompt (teacher
    forcing, right-padded batches, fp32 log-softmax via
    :func:`~torchtune_prefopt.modules.decoder_sequence_logprobs`)."""
    if len(prompts) != len(completions):
        raise ValueError("prompts and completions differ in length")
    out = []
    model_max = getattr(model, "max_seq_len", None)
    for start in range(0, len(prompts), batch_size):
        rows = []
        for p, c in zip(
            prompts[start : start + batch_size], completions[start : start + batch_size]
        ):
            if not c:
                raise ValueError("empty completion")
            p = list(p)
            if model_max is not None and len(p) + len(c) > model_max:
                p = p[len(p) + len(c) - int(model_max) :] or p[-1:]
            rows.append((p + list(c), [CROSS_ENTROPY_IGNORE_IDX] * len(p) + list(c)))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), CROSS_ENTROPY_IGNORE_IDX, dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
        lp = decoder_sequence_logprobs(
            model, ids.to(device), labels.to(device), chunk_size=chunk_size
        )
        out.append(lp.sum.detach().double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
