"""Row validation: every problem is a one-line error naming source/file, row and field.

Accepted row shapes (column names via ``column_map``):

* prompt / completion strings: ``{"prompt": str, "chosen": str, "rejected": str}``;
* prompt as a message list: ``{"prompt": [{"role": "user", "content": ...}], ...}``;
* completions as message lists, either a full conversation whose last message is the
  assistant answer (``{"chosen": [user, assistant], "rejected": [user, assistant]}``,
  the prompt column is then not needed) or assistant-only lists appended to the prompt.

The *completion* is always the final assistant message; everything before it is the prompt.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from torchtune_prefopt.errors import PrefOptUserError

ROLES = ("system", "user", "assistant", "ipython")


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
        if "content" not in m or m["content"] is None:
            raise row_error(where, f"{field}[{j}].content", "is missing")
        if not isinstance(m["content"], str):
            raise row_error(
                where,
                f"{field}[{j}].content",
                f"must be a string, got {type(m['content']).__name__}",
            )
        out.append({"role": m["role"], "content": m["content"]})
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


def completion_tail(row: Mapping[str, Any], column: str, where: str) -> List[Dict[str, Any]]:
    """The completion column as messages; the last one is a non-empty assistant message."""
    value = _get(row, column, where)
    if isinstance(value, str):
        if not value.strip():
            raise row_error(where, column, "is empty")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, (list, tuple)):
        msgs = _messages(value, where, column)
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


def conversation(
    row: Mapping[str, Any], prompt_col: str, completion_col: str, where: str
) -> List[Dict[str, Any]]:
    """Full conversation (prompt messages + completion) for one completion column.

    If the completion is a message list that already contains the prompt (any non-assistant
    message), it is used as is and the prompt column is not needed.
    """
    tail = completion_tail(row, completion_col, where)
    if any(m["role"] != "assistant" for m in tail):
        return tail
    return prompt_messages(row, prompt_col, where) + tail


def label_value(row: Mapping[str, Any], column: str, where: str) -> bool:
    value = _get(row, column, where)
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_":  # numpy.bool_ (parquet / pandas)
        return bool(value)
    raise row_error(where, column, f"must be a bool (true/false), got {_short(value)}")


def split_prompt(conv: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    return conv[:-1], conv[-1]
