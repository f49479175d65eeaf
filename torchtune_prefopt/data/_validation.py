"""Row validation: every problem is a one-line error naming source/file, row and field.

Accepted row shapes (column names via ``column_map``):

* prompt / completion strings: ``{"prompt": str, "chosen": str, "rejected": str}``;
* prompt as a message list: ``{"prompt": [{"role": "user", "content": ...}], ...}``;
* completions as message lists, either a full conversation whose last message is the
  assistant answer (``{"chosen": [user, assistant], "rejected": [user, assistant]}``,
  the prompt column is then not needed) or assistant-only lists appended to the prompt.

Conversations (see :func:`trajectories`): a completion is a *trajectory*, everything after
the shared prefix, which may hold several assistant turns with user or tool turns between
them. The shared prefix is the ``prompt`` column's messages when the row has one (a
completion that repeats them at its start is recognised), else the longest common prefix of
the chosen and rejected message lists (KTO: the messages before the first assistant turn).
Every assistant message of the trajectory is scored; everything else is context.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from torchtune_prefopt.errors import PrefOptUserError

ROLES = ("system", "user", "assistant", "ipython", "tool")
#: message keys kept besides role/content (tool use, as chat templates read them)
TOOL_KEYS = ("tool_calls", "name", "tool_call_id")


class DataRowError(PrefOptUserError):
    """A bad data row; the message is one line: ``<file> row <n>: field '<f>' <problem>``."""


def _short(value: Any, n: int = 40) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def row_error(where: str, field: str, problem: str) -> DataRowError:
    return DataRowError(" ".join(f"{where}: field '{field}' {problem}".split()))


def resolve_column_map(
    column_map: Optional[Mapping[str, str]], keys: Iterable[str], what: str
) -> Dict[str, str]:
    keys = list(keys)
    cmap = {k: k for k in keys}
    if column_map:
        unknown = sorted(set(column_map) - set(keys))
        if unknown:
            raise PrefOptUserError(
                f"{what} column_map has unknown key(s) {unknown}; valid keys: {keys}"
            )
        for k, v in dict(column_map).items():
            if not isinstance(v, str) or not v:
                raise PrefOptUserError(f"{what} column_map['{k}'] must be a column name")
            cmap[k] = v
    return cmap


def _messages(value: Any, where: str, field: str) -> List[Dict[str, Any]]:
    """Validate a list of {role, content} dicts; returns fresh dicts (safe to mutate)."""
    if len(value) == 0:
        raise row_error(where, field, "is an empty message list")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise row_error(where, f"{field}[{j}]", f"must be a message dict, got {_short(m)}")
        if "role" not in m or m["role"] is None:
            raise row_error(where, f"{field}[{j}].role", "is missing")
        if m["role"] not in ROLES:
            raise row_error(
                where,
                f"{field}[{j}].role",
                f"must be one of {list(ROLES)}, got {_short(m['role'])}",
            )
        content = m.get("content")
        if content is None and m["role"] == "assistant" and m.get("tool_calls"):
            content = ""  # a tool call without text
        if content is None:
            raise row_error(where, f"{field}[{j}].content", "is missing")
        if not isinstance(content, str):
            raise row_error(
                where,
                f"{field}[{j}].content",
                f"must be a string, got {type(content).__name__}",
            )
        msg = {"role": m["role"], "content": content}
        msg.update({k: m[k] for k in TOOL_KEYS if m.get(k) is not None})
        out.append(msg)
    return out


def _get(row: Mapping[str, Any], column: str, where: str) -> Any:
    if column not in row:
        raise row_error(where, column, "is missing")
    value = row[column]
    if value is None:
        raise row_error(where, column, "is missing (null)")
    return value


def prompt_messages(row: Mapping[str, Any], column: str, where: str) -> List[Dict[str, Any]]:
    value = _get(row, column, where)
    if isinstance(value, str):
        if not value.strip():
            raise row_error(where, column, "is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, (list, tuple)):
        msgs = _messages(value, where, column)
        if msgs[-1]["role"] == "assistant":
            raise row_error(where, column, "must not end with an assistant message")
        return msgs
    raise row_error(
        where, column, f"must be a string or a list of messages, got {type(value).__name__}"
    )


def completion_tail(
    row: Mapping[str, Any], column: str, where: str, require_final_assistant: bool = True
) -> List[Dict[str, Any]]:
    """The completion column as messages; the last one is a non-empty assistant message
    (checked here unless ``require_final_assistant=False``: :func:`trajectories` checks the
    part after the prompt)."""
    value = _get(row, column, where)
    if isinstance(value, str):
        if not value.strip():
            raise row_error(where, column, "is empty")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, (list, tuple)):
        msgs = _messages(value, where, column)
        if not require_final_assistant:
            return msgs
        last = msgs[-1]
        if last["role"] != "assistant":
            raise row_error(
                where, column, f"must end with an assistant message, got role '{last['role']}'"
            )
        if not last["content"].strip():
            raise row_error(where, f"{column}[{len(msgs) - 1}].content", "is empty")
        return msgs
    raise row_error(
        where,
        column,
        f"must be a non-empty string or a list of messages, got {type(value).__name__}",
    )


def _present(row: Mapping[str, Any], column: Optional[str]) -> bool:
    return column is not None and column in row and row[column] is not None


def _repeat_of_prompt(
    tail: List[Dict[str, Any]], prompt: List[Dict[str, Any]], prompt_is_text: bool
) -> Optional[int]:
    """How many leading messages of ``tail`` repeat the prompt (``None``: it does not)."""
    if tail[: len(prompt)] == prompt:
        return len(prompt)
    if prompt_is_text:  # "prompt": "Hi" with [system?, {"user": "Hi"}, assistant, ...]
        first = next((j for j, m in enumerate(tail) if m["role"] == "assistant"), len(tail))
        if first and tail[first - 1]["role"] == "user":
            if tail[first - 1]["content"] == prompt[0]["content"]:
                return first
    return None


def _check_trajectory(continuation: List[Dict[str, Any]], where: str, column: str) -> None:
    if not any(m["role"] == "assistant" for m in continuation):
        raise row_error(
            where,
            column,
            "has no assistant message after the prompt (a completion is scored on its "
            "assistant messages)",
        )
    last = continuation[-1]
    if last["role"] != "assistant":
        raise row_error(
            where,
            column,
            f"ends on a {last['role']} turn; a conversation must end with an assistant message",
        )
    if not last["content"].strip() and not last.get("tool_calls"):
        raise row_error(where, f"{column}[-1].content", "is empty")


def trajectories(
    row: Mapping[str, Any],
    prompt_col: Optional[str],
    completion_cols: Sequence[str],
    where: str,
) -> Tuple[List[Dict[str, Any]], List[List[Dict[str, Any]]]]:
    """``(prefix, continuations)``: the shared prefix messages and, per completion column, the
    trajectory after it (see the module docstring).

    * With a ``prompt`` (string or messages) in the row: the prefix is the prompt; a
      completion that starts with the prompt's messages (or, for a string prompt, with a
      block ending in that user message) repeats it and is cut after it; a completion that
      starts with any other non-assistant message is ambiguous (one line).
    * Without one: the completions are whole conversations; the prefix is their longest
      common prefix of messages (one completion: the messages before its first assistant
      turn). An empty prefix returns ``([], ...)`` (the caller decides: differing prompts).

    Every continuation has an assistant message and ends with one (else one line).
    """
    tails = [completion_tail(row, c, where, require_final_assistant=False) for c in completion_cols]
    if _present(row, prompt_col):
        prompt = prompt_messages(row, prompt_col, where)
        is_text = isinstance(row[prompt_col], str)
        conts, prefixes = [], []
        for tail, col in zip(tails, completion_cols):
            side_prefix = prompt
            if tail[0]["role"] != "assistant":
                cut = _repeat_of_prompt(tail, prompt, is_text)
                if cut is None:
                    raise row_error(
                        where,
                        col,
                        f"starts with a {tail[0]['role']} message that does not repeat field "
                        f"'{prompt_col}'; give either the continuation after the prompt (from "
                        "the first assistant turn) or the whole conversation with no prompt "
                        "column",
                    )
                side_prefix = tail[:cut]  # the prompt with its context (a system prompt)
                tail = tail[cut:]
            conts.append(tail)
            prefixes.append(side_prefix)
        if any(p != prefixes[0] for p in prefixes):
            raise row_error(
                where,
                completion_cols[-1],
                f"repeats field '{prompt_col}' after other messages than field "
                f"'{completion_cols[0]}' does; the shared prompt is ambiguous",
            )
        prefix = prefixes[0]
    else:
        if len(tails) == 1:
            n = next((j for j, m in enumerate(tails[0]) if m["role"] == "assistant"), 0)
        elif all(t == tails[0] for t in tails):
            n = len(tails[0]) - 1  # identical completions: the caller drops the row
        else:
            n = 0
            while all(len(t) > n for t in tails) and all(t[n] == tails[0][n] for t in tails):
                n += 1
        if n == 0:
            if len(tails) == 1 or all(t[0]["role"] == "assistant" for t in tails):
                prompt_messages(row, prompt_col or "prompt", where)  # no prompt: one line
            return [], tails  # whole conversations that differ from the first message
        prefix = tails[0][:n]
        conts = [t[n:] for t in tails]
    for cont, col in zip(conts, completion_cols):
        _check_trajectory(cont, where, col)
    return prefix, conts


def label_value(row: Mapping[str, Any], column: str, where: str) -> bool:
    value = _get(row, column, where)
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_":  # numpy.bool_ (parquet / pandas)
        return bool(value)
    raise row_error(where, column, f"must be a bool (true/false), got {_short(value)}")
