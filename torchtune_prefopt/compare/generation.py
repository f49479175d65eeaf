"""Generation helpers for the comparison: chat-template prompts, batched sampling, log-probs.

Prompts are the held-out pairs' prompt tokens exactly as the data pipeline built them with
the tokenizer's chat template (everything before the first label token: the conversation so
far plus the assistant header, e.g. ``<|im_start|>assistant\\n``), so the models are asked in
the format they were trained on. Generation is :func:`torchtune.generation.generate`
(left-padded batches, KV cache), greedy (``temperature=0``: top-1) or sampled with a seeded
``torch.Generator``; every model gets the same seed, so sampled comparisons use common random
numbers.
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

    ``temperature=0`` is greedy decoding (top-1); otherwise torchtune's sampler (exponential
    race: exact samples from ``softmax(logits / temperature)``, optionally top-k) with one
    ``torch.Generator`` seeded with ``seed`` for the whole call. Prompts longer than the
    model's ``max_seq_len - max_new_tokens`` keep their last tokens.
    """
    from torchtune.generation import generate
    from torchtune.modules import local_kv_cache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    greedy = temperature is None or float(temperature) <= 0.0
    rng = None
    if not greedy and seed is not None:
        rng = torch.Generator(device=device)
        rng.manual_seed(int(seed))
    model_max = getattr(model, "max_seq_len", None)
    keep = None if model_max is None else max(1, int(model_max) - max_new_tokens)
    stop = set(int(t) for t in stop_tokens)
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
            for i, p in enumerate(chunk):
                batch[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            batch = batch.to(device)
            kwargs = dict(
                max_generated_tokens=max_new_tokens,
                pad_id=pad_id,
                temperature=1.0 if greedy else float(temperature),
                top_k=1 if greedy else top_k,
                stop_tokens=list(stop) or None,
                rng=rng,
            )
            if kv_cache and hasattr(model, "setup_caches") and not model.caches_are_setup():
                with local_kv_cache(
                    model,
                    batch_size=len(chunk),
                    device=device,
                    dtype=dtype,
                    decoder_max_seq_len=width + max_new_tokens,
                ):
                    out, _ = generate(model, batch, **kwargs)
            else:
                out, _ = generate(model, batch, **kwargs)
            for row in out[:, width:].tolist():
                results.append(_cut_at_stop(row, stop))
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
