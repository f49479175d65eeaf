"""A tokenizer component over a Hugging Face folder that renders conversations with the
folder's own chat template (``tokenizer: {_component_: ...hf_tokenizer, model_dir: ...}``).

It wraps ``transformers``' fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json`` or
``chat_template.jinja``) and its ``apply_chat_template`` (Jinja), and offers what the recipe's
data pipeline uses from a torchtune ``ModelTokenizer``: ``tokenize_messages``, ``encode``,
``decode``, ``pad_id``, ``eos_id``, ``bos_id``, ``stop_tokens``, ``max_seq_len``.

How a conversation ending in an assistant message is split (:meth:`tokenize_prompt_completion`):

* prompt = the template rendered for the messages before the answer with the generation
  prompt (``add_generation_prompt=True``): system prompt and BOS exactly as the template says;
* full = the template rendered for all messages; the prompt must be a prefix of it (else one
  ``error:`` line: such a template cannot be scored as prompt + completion);
* the scored completion = the rest of ``full`` up to and including the assistant's
  end-of-turn token: whitespace the template puts after it (ChatML's ``"\\n"``) is not scored.

``full`` (without that trailing whitespace) and the prompt are tokenized as
``apply_chat_template`` tokenizes (no special tokens added); the conversation's ids must start
with the prompt's (else a token spans the cut: one line), and the rest is the completion. So ``prompt_ids + completion_ids`` equals ``apply_chat_template(messages)``'s ids up to that
whitespace, and ``prompt_ids`` equals ``apply_chat_template(prompt, add_generation_prompt=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from torchtune_prefopt.errors import PrefOptUserError

__all__ = ["HFChatTokenizer", "hf_tokenizer"]


def _message_dict(m: Any) -> Dict[str, Any]:
    """A torchtune ``Message`` (or a ``{"role", "content"}`` dict, with ``tool_calls`` /
    ``name`` / ``tool_call_id`` when given) as the template expects."""
    if isinstance(m, Mapping):
        out = {"role": "tool" if m["role"] == "ipython" else m["role"], "content": m["content"]}
        out.update({k: m[k] for k in ("tool_calls", "name", "tool_call_id") if k in m})
        return out
    role = "tool" if m.role == "ipython" else m.role
    return {"role": role, "content": m.text_content}


class HFChatTokenizer:
    """See the module docstring.

    Args:
        model_dir: folder with ``tokenizer.json`` (and ``tokenizer_config.json`` /
            ``chat_template.jinja``), usually the model folder.
        max_seq_len: longest row (prompt tokens are dropped first by the datasets).
        chat_template_kwargs: extra variables for the template (e.g. ``enable_thinking``).
    """

    def __init__(
        self,
        model_dir: str,
        max_seq_len: Optional[int] = None,
        chat_template_kwargs: Optional[Mapping[str, Any]] = None,
    ) -> None:
        from transformers import AutoTokenizer

        folder = Path(str(model_dir)).expanduser()
        if not (folder / "tokenizer.json").is_file():
            raise PrefOptUserError(
                f"tokenizer.model_dir: {folder} has no tokenizer.json (a Hugging Face fast "
                "tokenizer is needed)"
            )
        try:
            self.hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as err:  # transformers raises many kinds for a bad folder
            msg = " ".join(str(err).split())[:300]
            raise PrefOptUserError(
                f"tokenizer.model_dir: {folder}: {type(err).__name__}: {msg}"
            ) from None
        if not getattr(self.hf, "chat_template", None):
            raise PrefOptUserError(
                f"tokenizer.model_dir: {folder} has no chat template (tokenizer_config.json "
                "'chat_template' or chat_template.jinja); preference rows are conversations"
            )
        self.model_dir = folder
        self.max_seq_len = max_seq_len
        self.template_kwargs = dict(chat_template_kwargs or {})
        self.eos_id = self.hf.eos_token_id
        self.bos_id = self.hf.bos_token_id
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id
        if self.eos_id is None:
            raise PrefOptUserError(
                f"tokenizer.model_dir: {folder}: the tokenizer has no eos_token "
                "(tokenizer_config.json)"
            )
        self.special_tokens = {t: i for t, i in self.hf.get_added_vocab().items()}
        self.stop_tokens = sorted({self.eos_id, *self._generation_eos()})

    def _generation_eos(self) -> List[int]:
        import json

        path = self.model_dir / "generation_config.json"
        try:
            eos = json.loads(path.read_text()).get("eos_token_id", [])
        except (OSError, ValueError):
            return []
        return [eos] if isinstance(eos, int) else [i for i in eos if isinstance(i, int)]

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    # ------------------------------------------------------------------ rendering
    def render(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool = False,
        tools: Optional[List[Any]] = None,
    ) -> str:
        """The template's text for ``messages`` (``tools``: function schemas, as
        ``apply_chat_template(..., tools=...)`` takes them)."""
        return self.hf.apply_chat_template(
            [_message_dict(m) for m in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **({"tools": tools} if tools else {}),
            **self.template_kwargs,
        )

    def _ids(self, text: str) -> List[int]:
        """``text``'s ids as ``apply_chat_template`` tokenizes (no special tokens added)."""
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def tokenize_prompt_completion(
        self, messages: Sequence[Any], tools: Optional[List[Any]] = None
    ) -> Tuple[List[int], List[int]]:
        """``(prompt_ids, completion_ids)`` of a conversation whose last message is the
        assistant's answer (see the module docstring)."""
        if not messages or _message_dict(messages[-1])["role"] != "assistant":
            raise ValueError("the last message must be the assistant's answer")
        prompt = self.render(messages[:-1], add_generation_prompt=True, tools=tools)
        full = self.render(messages, tools=tools)
        if not full.startswith(prompt):
            raise PrefOptUserError(
                f"tokenizer: the chat template of {self.model_dir} does not render the prompt "
                "(with the generation prompt) as a prefix of the whole conversation, so the "
                f"answer cannot be scored as a completion; prompt ends {prompt[-40:]!r}, the "
                f"conversation has {full[len(prompt) - 40 : len(prompt)]!r} there"
            )
        # whitespace after the end-of-turn token is not scored
        full = prompt + full[len(prompt) :].rstrip()
        prompt_ids, ids = self._ids(prompt), self._ids(full)
        if ids[: len(prompt_ids)] != prompt_ids:
            raise PrefOptUserError(
                f"tokenizer: with the chat template of {self.model_dir}, the conversation's "
                "tokens do not start with the prompt's tokens (a token spans the end of the "
                "prompt and the start of the answer), so the answer cannot be scored alone"
            )
        return prompt_ids, ids[len(prompt_ids) :]

    def tokenize_messages(
        self, messages: Sequence[Any], add_end_tokens: bool = True
    ) -> Tuple[List[int], List[bool]]:
        """torchtune's interface: ``(ids, mask)``, ``mask`` True on prompt tokens (not scored).
        A conversation not ending in an assistant message is all prompt."""
        if messages and _message_dict(messages[-1])["role"] == "assistant":
            prompt, completion = self.tokenize_prompt_completion(messages)
            return prompt + completion, [True] * len(prompt) + [False] * len(completion)
        ids = self._ids(self.render(messages, add_generation_prompt=not add_end_tokens))
        return ids, [True] * len(ids)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        ids = list(self.hf(text, add_special_tokens=False)["input_ids"])
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Dict[str, Any]:
        """torchtune's ``Transform`` interface (``sample["messages"]`` -> tokens, mask)."""
        ids, mask = self.tokenize_messages(sample["messages"], add_end_tokens=not inference)
        return {**sample, "tokens": ids, "mask": mask}


def hf_tokenizer(
    model_dir: str,
    max_seq_len: Optional[int] = None,
    chat_template_kwargs: Optional[Mapping[str, Any]] = None,
) -> HFChatTokenizer:
    """``tokenizer`` component: :class:`HFChatTokenizer` over ``model_dir``."""
    return HFChatTokenizer(model_dir, max_seq_len, chat_template_kwargs)
