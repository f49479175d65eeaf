"""Tokenization into (prompt, completion) and completion-preserving truncation."""

from __future__ import annotations

import copy
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as CROSS_ENTROPY_IGNORE_IDX  # re-exported
from torchtune.data import Message

from torchtune_prefopt.errors import PrefOptUserError

# CROSS_ENTROPY_IGNORE_IDX (torchtune's -100): the one label value that is not scored.

#: what a tokenizer error suggests instead
HF_TOKENIZER_HINT = (
    "for a Hugging Face folder use torchtune_prefopt.models.hf.hf_tokenizer with "
    "model_dir=<folder> (its tokenizer.json and chat template)"
)


def untruncated(tokenizer):
    """A shallow copy of ``tokenizer`` that does not truncate (we truncate ourselves).

    torchtune tokenizers cut ``tokenize_messages`` output at ``max_seq_len`` from the right,
    which would drop the completion; the datasets here instead drop prompt tokens first.
    """
    if getattr(tokenizer, "max_seq_len", None) is None:
        return tokenizer
    tok = copy.copy(tokenizer)
    tok.max_seq_len = None
    return tok


def resolve_max_seq_len(tokenizer, max_seq_len: Optional[int]) -> Optional[int]:
    if max_seq_len is None:
        max_seq_len = getattr(tokenizer, "max_seq_len", None)
    if max_seq_len is None:
        return None
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise PrefOptUserError(f"max_seq_len must be an integer >= 2 or null, got {max_seq_len!r}")
    return max_seq_len


def tokenize_split(
    tokenizer, messages: Sequence[Any], tools: Optional[List[Any]] = None
) -> Tuple[List[int], List[int]]:
    """Chat-template tokenization of ``messages`` split into (prompt_ids, completion_ids).

    ``prompt_ids + completion_ids == tokenizer.tokenize_messages(messages)[0]`` exactly (one
    call, so nothing such as a BOS/EOS is added between prompt and completion). The split
    point is the first token of the final (assistant) message's *content*: everything before
    it, including the assistant header of the template (``<|im_start|>assistant\\n``), is
    prompt; the content and the template's end tokens (EOS) are the completion.
    ``tokenizer`` must not truncate (see :func:`untruncated`). A tokenizer that knows its
    own split (``tokenize_prompt_completion``: the HF chat-template tokenizer) decides it.
    """
    own_split = getattr(tokenizer, "tokenize_prompt_completion", None)
    if own_split is not None:
        return own_split(list(messages), tools=tools) if tools else own_split(list(messages))
    if tools:
        raise PrefOptUserError(
            f"tokenizer: {type(tokenizer).__name__} cannot render a 'tools' column (function "
            f"schemas); {HF_TOKENIZER_HINT}"
        )
    messages = [_torchtune_message(m, i < len(messages) - 1) for i, m in enumerate(messages)]
    if not callable(getattr(tokenizer, "tokenize_messages", None)):
        raise PrefOptUserError(
            f"tokenizer: {type(tokenizer).__name__} has no tokenize_messages(): the datasets "
            f"render chat conversations and need a torchtune ModelTokenizer; {HF_TOKENIZER_HINT}"
        )
    ids, mask = tokenizer.tokenize_messages(list(messages))
    last = messages[-1]
    head = list(messages[:-1]) + [
        Message(role=last.role, content="", masked=last.masked, ipython=last.ipython, eot=False)
    ]
    # Default kwargs: the end-token flag is spelled differently across torchtune tokenizers
    # (add_eos / add_end_tokens). Whatever follows the header in ``head_ids`` (an EOS) is
    # cut off by taking the common prefix.
    head_ids, _ = tokenizer.tokenize_messages(head)
    b = 0
    for x, y in zip(ids, head_ids):
        if x != y:
            break
        b += 1
    if not 0 < b < len(ids):
        # Fallback for tokenizers whose header depends on content: the tokenizer's own mask
        # (the final message is the first unmasked one when the prompt is masked).
        unmasked = [i for i, m in enumerate(mask) if not m]
        if not unmasked:
            raise ValueError("could not locate the completion in the tokenized messages")
        b = unmasked[0]
    return list(ids[:b]), list(ids[b:])


def _torchtune_message(m: Any, masked: bool) -> Message:
    """A validated ``{"role", "content"}`` dict (or a Message) as a torchtune ``Message``."""
    if isinstance(m, Message):
        return m
    if m.get("tool_calls"):
        raise PrefOptUserError(
            "tokenizer: an assistant message with tool_calls needs the model's own chat "
            f"template; {HF_TOKENIZER_HINT}"
        )
    role = "ipython" if m["role"] == "tool" else m["role"]
    return Message(role=role, content=m["content"], masked=masked)


def decode_text(tokenizer, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """``tokenizer.decode(ids)``, with or without special tokens where the tokenizer takes the
    flag (torchtune's and ours do; a tokenizer whose ``decode`` has no such argument decodes
    as it does)."""
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
    except TypeError:
        return tokenizer.decode(list(ids))


def _is_end_or_space(tokenizer, token: int) -> bool:
    """A token that closes a turn when it is the last one: an end token or whitespace."""
    ends = {getattr(tokenizer, "eos_id", None), *getattr(tokenizer, "stop_tokens", ())}
    return token in ends or not decode_text(tokenizer, [token]).strip()


def tokenize_conversation(
    tokenizer,
    messages: Sequence[Mapping[str, Any]],
    n_prefix: int,
    *,
    tools: Optional[List[Any]] = None,
    train_on_input: bool = False,
) -> Tuple[List[int], List[int], int]:
    """``(ids, labels, n_prompt)`` of a conversation whose messages after the first
    ``n_prefix`` are a trajectory (see ``_validation.trajectories``).

    ``ids`` is the chat template's tokenization of all ``messages`` (one call: the final
    assistant message split as in :func:`tokenize_split`). ``labels`` equals ``ids`` on the
    tokens of every assistant message of the trajectory (its content and end-of-turn, as for
    one message) and is -100 elsewhere: the prefix, user/tool/system messages inside the
    trajectory and the role headers (``train_on_input``: ``labels == ids``). ``n_prompt`` is
    the index of the first scored token (everything before it is context).

    The span of an intermediate assistant message ``k`` is found from the template's own
    output: ``(p, c) = tokenize_split(messages[:k + 1])``; ``ids`` must start with ``p`` and
    continue with ``c`` up to at most end tokens or whitespace (what ends the last turn of a
    rendering). A template that renders an earlier turn differently once the conversation
    goes on (Qwen3 drops the ``<think>`` block of earlier turns) cannot be scored turn by
    turn: one line.
    """
    prompt, completion = tokenize_split(tokenizer, messages, tools)
    ids = prompt + completion
    labels = [CROSS_ENTROPY_IGNORE_IDX] * len(prompt) + list(completion)
    n_prompt = len(prompt)
    for k in range(n_prefix, len(messages) - 1):
        if messages[k]["role"] != "assistant":
            continue
        p, c = tokenize_split(tokenizer, messages[: k + 1], tools)
        m = 0 if ids[: len(p)] != p else common_prefix(c, ids[len(p) :])
        if m == 0 or not all(_is_end_or_space(tokenizer, t) for t in c[m:]):
            raise PrefOptUserError(
                f"tokenizer: the chat template renders assistant message {k} differently once "
                "the conversation continues after it (it may drop an earlier turn's reasoning "
                "block), so its tokens cannot be located in the whole conversation; give one "
                "row per assistant turn (the conversation so far as the prompt)"
            )
        labels[len(p) : len(p) + m] = ids[len(p) : len(p) + m]
        n_prompt = min(n_prompt, len(p))
    if train_on_input:
        labels = list(ids)
    return ids, labels, n_prompt


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    k, n = 0, min(len(a), len(b))
    while k < n and a[k] == b[k]:
        k += 1
    return k


def truncate_keep_completion(
    prompt: List[int], completions: Sequence[List[int]], max_seq_len: Optional[int]
) -> Tuple[List[int], List[List[int]], bool, bool]:
    """Fit ``prompt + c`` into ``max_seq_len`` for every ``c`` in ``completions``.

    One prompt is kept for all completions (chosen and rejected keep an identical prompt).
    Prompt tokens are dropped first, from the left (at least one prompt token is kept so
    every completion token is predicted from something); only if the longest completion
    still does not fit is each completion cut at its end (losing its EOS).

    Returns ``(prompt, completions, prompt_truncated, completion_truncated)``.
    """
    if max_seq_len is None:
        return prompt, list(completions), False, False
    longest = max(len(c) for c in completions)
    if len(prompt) + longest <= max_seq_len:
        return prompt, list(completions), False, False
    keep = max(max_seq_len - longest, min(1, len(prompt)))
    new_prompt = prompt[len(prompt) - keep :] if keep > 0 else []
    budget = max_seq_len - len(new_prompt)
    new_completions = [c[:budget] for c in completions]
    return (
        new_prompt,
        new_completions,
        len(new_prompt) < len(prompt),
        any(len(n) < len(c) for n, c in zip(new_completions, completions)),
    )


def too_long_error(name: str, n_rows: int, shortest: int, max_seq_len: int) -> PrefOptUserError:
    return PrefOptUserError(
        f"{name}: all {n_rows} rows are longer than max_seq_len={max_seq_len} tokens "
        f"(shortest row: {shortest} tokens); raise max_seq_len (tokenizer.max_seq_len or the "
        "dataset's max_seq_len)"
    )
