"""Builders for public preference data sets, on top of the paired / KTO machinery.

=====================================  =========================================  =========
builder                                upstream data set (Hub name) and columns   rows
=====================================  =========================================  =========
:func:`hh_rlhf_dataset`                ``Anthropic/hh-rlhf``: ``chosen``,          paired
                                       ``rejected`` full transcripts
                                       (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``)
:func:`ultrafeedback_binarized_dataset` ``HuggingFaceH4/ultrafeedback_binarized``:  paired
                                       ``chosen``/``rejected`` message lists;
                                       splits ``train_prefs``/``test_prefs``
:func:`stack_exchange_paired_dataset`  ``lvwerra/stack-exchange-paired``:          paired
                                       ``question``, ``response_j`` (better),
                                       ``response_k`` (worse)
:func:`thumbs_dataset`                 any thumbs-up/down feedback log:           KTO
                                       ``prompt``, ``completion``, ``label`` or
                                       ``thumbs`` (``"up"``/``"down"``/bool)
=====================================  =========================================  =========

Every builder takes the torchtune tokenizer first and renders the conversation with the
tokenizer's own chat template (``tokenizer.tokenize_messages``: ChatML for Qwen, the
header/eot template for Llama 3, ...); hh-rlhf's ``Human``/``Assistant`` turns become
``user``/``assistant`` messages, so the raw ``"\\n\\nHuman:"`` markers never reach the model.
Prompt and completion come from ONE tokenization of the whole conversation, split at the
start of the final assistant message (no BOS/EOS is added between them).
``new_system_prompt`` replaces or adds a system message.

Loading: ``source`` defaults to the Hub name (``datasets.load_dataset``; extra keyword
arguments such as ``data_dir="harmless-base"`` or ``split="train[:2%]"`` go to it); local
copies in the upstream format work with ``source="json", data_files=...`` (JSON/JSONL
parsed here, errors name file and line) or any other ``load_dataset`` builder
(``"parquet"``, ...). With a single local file (``data_files`` not a split mapping) the
split is ``"train"`` unless you pass one.

Public dumps contain a few broken rows (an empty final answer, a transcript that does not
end with the assistant, chosen/rejected transcripts that diverge before the last answer).
Those rows are *dropped and counted* (``dataset.stats["dropped_<reason>"]``, one warning
naming the first such row) instead of aborting the load; a missing column still raises a
one-line error (it means a wrong data set or ``column_map``).

The paired builders also take ``unpaired=True``: the same rows as a KTO dataset (chosen ->
desirable, rejected -> undesirable, via :func:`~torchtune_prefopt.data.unpaired_from_paired`'s
interleaving), so KTO can train on exactly the data the paired losses see.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from torchtune_prefopt.data._common import resolve_max_seq_len
from torchtune_prefopt.data._paired import PreferenceDataset, prepare_pairs
from torchtune_prefopt.data._source import RawRows, load_rows
from torchtune_prefopt.data._unpaired import KTODataset, kto_from_raw, unpaired_from_raw
from torchtune_prefopt.data._validation import prompt_messages, resolve_column_map, row_error
from torchtune_prefopt.errors import PrefOptUserError

__all__ = [
    "HH_RLHF",
    "STACK_EXCHANGE_PAIRED",
    "ULTRAFEEDBACK_BINARIZED",
    "hh_rlhf_dataset",
    "parse_hh_transcript",
    "stack_exchange_paired_dataset",
    "thumbs_dataset",
    "thumbs_label",
    "ultrafeedback_binarized_dataset",
]

HH_RLHF = "Anthropic/hh-rlhf"
ULTRAFEEDBACK_BINARIZED = "HuggingFaceH4/ultrafeedback_binarized"
STACK_EXCHANGE_PAIRED = "lvwerra/stack-exchange-paired"

_LOCAL_SOURCES = {"json", "jsonl", "csv", "parquet", "arrow", "text"}


class _Skip(Exception):
    """A row that is dropped and counted (reason = the stats key suffix)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- helpers


def _split_for(source: str, split: Optional[str], default: str, kwargs: Mapping[str, Any]) -> str:
    """The split to load: explicit > 'train' for one local file > the upstream default."""
    if split is not None:
        return split
    if source in _LOCAL_SOURCES and not isinstance(kwargs.get("data_files"), Mapping):
        return "train"
    return default


def _column(row: Mapping[str, Any], column: str, where: str) -> Any:
    if column not in row:
        raise row_error(where, column, "is missing (wrong data set or column_map?)")
    return row[column]


def _normalise(
    raw: RawRows, convert: Callable[[Mapping[str, Any], str], Dict[str, Any]], what: str
) -> Tuple[RawRows, Dict[str, int]]:
    """Apply ``convert`` to every row; rows raising :class:`_Skip` are dropped and counted."""
    rows, origin, skipped = [], [], Counter()
    first: Dict[str, str] = {}
    for i, row in enumerate(raw.rows):
        where = raw.where(i)
        try:
            new = convert(row, where)
        except _Skip as s:
            skipped[s.reason] += 1
            first.setdefault(s.reason, f"{where}{': ' + s.detail if s.detail else ''}")
            continue
        rows.append(new)
        origin.append(raw.origin[i])
    counters = {f"dropped_{k}": v for k, v in sorted(skipped.items())}
    if skipped:
        detail = "; ".join(
            f"{v} {k.replace('_', ' ')} (first: {first[k]})" for k, v in sorted(skipped.items())
        )
        warnings.warn(
            f"{what} {raw.name}: dropped {sum(skipped.values())} row(s): {detail}",
            UserWarning,
            stacklevel=3,
        )
    if not rows:
        raise PrefOptUserError(
            f"{what} {raw.name}: no usable rows ({dict(skipped)} of {len(raw.rows)})"
        )
    return RawRows(rows, origin, raw.name), counters


def _check_final_answer(conv: List[Dict[str, str]], side: str) -> None:
    if not conv or conv[-1]["role"] != "assistant":
        raise _Skip("no_final_answer", f"{side} does not end with an assistant turn")
    if not conv[-1]["content"].strip():
        raise _Skip("empty_answer", f"{side}'s final answer is empty")
    if not any(m["role"] == "user" for m in conv[:-1]):
        raise _Skip("no_prompt", f"{side} has no user turn before the answer")


def _shared_prefix(chosen: List[Dict[str, str]], rejected: List[Dict[str, str]]) -> None:
    """Chosen and rejected must share every message but the final answer (= the prompt)."""
    if chosen[:-1] != rejected[:-1]:
        raise _Skip("diverging_prompt", "chosen and rejected differ before the final answer")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        raise _Skip("identical", "chosen and rejected answers are identical")


def _paired_result(
    raw: RawRows,
    counters: Dict[str, int],
    tokenizer,
    *,
    unpaired: bool,
    train_on_input: bool,
    new_system_prompt: Optional[str],
    max_seq_len: Optional[int],
    what: str,
) -> Union[PreferenceDataset, KTODataset]:
    max_len = resolve_max_seq_len(tokenizer, max_seq_len)
    cmap = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
    if unpaired:
        if train_on_input:
            raise PrefOptUserError(
                f"{what}: train_on_input is not supported with unpaired=True (KTO)"
            )
        ds = unpaired_from_raw(raw, tokenizer, cmap, new_system_prompt, max_len)
    else:
        records, base = prepare_pairs(
            raw,
            tokenizer,
            column_map=cmap,
            train_on_input=train_on_input,
            new_system_prompt=new_system_prompt,
            what=what,
        )
        ds = PreferenceDataset(
            records, base, name=raw.name, max_seq_len=max_len, train_on_input=train_on_input
        )
    # our drop counters, on top of the machinery's; "rows" = rows in the source
    ds.stats = {**ds.stats, **counters, "rows": ds.stats["rows"] + sum(counters.values())}
    return ds


# --------------------------------------------------------------------------- local files / any source


def preference_dataset(
    tokenizer,
    *,
    source: str,
    column_map: Optional[Dict[str, str]] = None,
    train_on_input: bool = False,
    new_system_prompt: Optional[str] = None,
    split: str = "train",
    max_seq_len: Optional[int] = None,
    unpaired: bool = False,
    **load_dataset_kwargs: Any,
) -> Union[PreferenceDataset, KTODataset]:
    """Paired preference dataset (chosen vs rejected), validated and tokenized eagerly.

    Args:
        tokenizer: a torchtune ``ModelTokenizer`` with ``tokenize_messages`` (chat template).
        source: ``"json"`` (with ``data_files=``: local JSON / JSONL), another
            ``datasets.load_dataset`` builder (``"parquet"``, ``"csv"`` with ``data_files``),
            or a Hub dataset name.
        column_map: maps ``"prompt"``, ``"chosen"``, ``"rejected"`` to the column names.
            ``chosen``/``rejected`` are strings (then ``prompt`` is a string or a message
            list) or message lists (a full conversation ending in the assistant answer, as
            in torchtune's ``ChosenRejectedToMessages``; then ``prompt`` is not needed).
        train_on_input: also put labels on prompt tokens (default: -100 there).
        new_system_prompt: replace any system message with this one.
        split: dataset split (local files: ``"train"`` unless ``data_files`` is a dict).
        max_seq_len: max tokens per sequence; defaults to ``tokenizer.max_seq_len``.
            Longer rows drop prompt tokens from the left first (chosen and rejected keep the
            same prompt), then cut the completions' ends. Counted in ``stats``.
        unpaired: the same rows as a KTO dataset instead (chosen -> desirable, rejected ->
            undesirable; :func:`~torchtune_prefopt.data.unpaired_from_paired`).
        **load_dataset_kwargs: ``data_files``, ``field``, or other ``load_dataset`` kwargs.

    Each item: ``{"chosen_input_ids", "chosen_labels", "rejected_input_ids",
    "rejected_labels", "index"}`` with labels -100 on prompt and template tokens.

    Raises:
        ValueError (:class:`~torchtune_prefopt.errors.PrefOptUserError`): a bad row (one line
        naming file, row and field), no usable rows, or every row longer than max_seq_len.
    """
    raw = load_rows(source, split=split, **load_dataset_kwargs)
    if unpaired:
        if train_on_input:
            raise PrefOptUserError(
                "preference_dataset: train_on_input is not supported with unpaired=True (KTO)"
            )
        return unpaired_from_raw(
            raw,
            tokenizer,
            column_map,
            new_system_prompt,
            resolve_max_seq_len(tokenizer, max_seq_len),
        )
    max_len = resolve_max_seq_len(tokenizer, max_seq_len)
    records, counters = prepare_pairs(
        raw,
        tokenizer,
        column_map=column_map,
        train_on_input=train_on_input,
        new_system_prompt=new_system_prompt,
    )
    return PreferenceDataset(
        records, counters, name=raw.name, max_seq_len=max_len, train_on_input=train_on_input
    )


# --------------------------------------------------------------------------- hh-rlhf

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh_transcript(text: str) -> List[Dict[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b ..."`` -> ``[{"role": "user", "content": "a"}, ...]``.

    Raises ``ValueError`` if the text does not start with a ``Human``/``Assistant`` marker.
    Turn contents are stripped of surrounding whitespace; consecutive turns of the same
    speaker are kept as they are.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a transcript string, got {type(text).__name__}")
    if not text.startswith("\n\n"):  # a few rows start with "Human:" directly
        text = "\n\n" + text.lstrip()
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("does not start with '\\n\\nHuman:' / '\\n\\nAssistant:'")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [
        {"role": roles[parts[k]], "content": parts[k + 1].strip()} for k in range(1, len(parts), 2)
    ]


def hh_rlhf_dataset(
    tokenizer,
    *,
    source: str = HH_RLHF,
    column_map: Optional[Dict[str, str]] = None,
    split: Optional[str] = None,
    unpaired: bool = False,
    train_on_input: bool = False,
    new_system_prompt: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    **load_dataset_kwargs: Any,
) -> Union[PreferenceDataset, KTODataset]:
    """Anthropic's HH-RLHF (``Anthropic/hh-rlhf``; ``data_dir="helpful-base"`` etc. picks a subset).

    Each row holds two full transcripts, ``chosen`` and ``rejected``, in the raw
    ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` format, multi-turn. Both are parsed into
    messages (:func:`parse_hh_transcript`); the messages they share (every turn but the
    final assistant answer) are the prompt, the two final answers the completions. Rows
    whose transcripts diverge earlier, do not end with an assistant answer, or end with an
    empty one are dropped and counted. ``column_map`` may rename ``chosen``/``rejected``.
    Splits: ``train``, ``test``.

    Returns a :class:`PreferenceDataset`, or with ``unpaired=True`` a :class:`KTODataset`.
    """
    cmap = resolve_column_map(column_map, ("chosen", "rejected"), "hh_rlhf_dataset")
    split = _split_for(source, split, "train", load_dataset_kwargs)
    raw = load_rows(source, split=split, **load_dataset_kwargs)

    def convert(row, where):
        convs = {}
        for side in ("chosen", "rejected"):
            text = _column(row, cmap[side], where)
            try:
                conv = parse_hh_transcript(text)
            except ValueError as e:
                raise _Skip("unparseable", f"{cmap[side]} {e}") from None
            _check_final_answer(conv, cmap[side])
            convs[side] = conv
        _shared_prefix(convs["chosen"], convs["rejected"])
        return convs

    norm, counters = _normalise(raw, convert, "hh_rlhf_dataset")
    return _paired_result(
        norm,
        counters,
        tokenizer,
        unpaired=unpaired,
        train_on_input=train_on_input,
        new_system_prompt=new_system_prompt,
        max_seq_len=max_seq_len,
        what="hh_rlhf_dataset",
    )


# --------------------------------------------------------------------------- UltraFeedback


def _message_list(value: Any, column: str, where: str) -> List[Dict[str, str]]:
    if not isinstance(value, (list, tuple)):
        raise row_error(where, column, f"must be a list of messages, got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise row_error(where, f"{column}[{j}]", "must be a {role, content} message")
        if m["content"] is None:
            raise _Skip("empty_answer", f"{column}[{j}].content is null")
        out.append({"role": str(m["role"]), "content": str(m["content"])})
    return out


def ultrafeedback_binarized_dataset(
    tokenizer,
    *,
    source: str = ULTRAFEEDBACK_BINARIZED,
    column_map: Optional[Dict[str, str]] = None,
    split: Optional[str] = None,
    drop_ties: bool = True,
    unpaired: bool = False,
    train_on_input: bool = False,
    new_system_prompt: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    **load_dataset_kwargs: Any,
) -> Union[PreferenceDataset, KTODataset]:
    """UltraFeedback, binarized (``HuggingFaceH4/ultrafeedback_binarized``; Zephyr's DPO data).

    Columns: ``prompt`` (str), ``chosen`` and ``rejected`` (message lists
    ``[{"role": "user", ...}, {"role": "assistant", ...}]``, the whole conversation),
    ``score_chosen``/``score_rejected``. The shared messages are the prompt, the final
    assistant answers the completions (the ``prompt`` column is only used when the lists
    hold just the answer). Splits: ``train_prefs`` (default) and ``test_prefs`` (the
    ``*_sft``/``*_gen`` splits are not preference data). ``drop_ties``: drop rows with
    ``score_chosen == score_rejected`` (counted). Empty answers are dropped and counted.

    Returns a :class:`PreferenceDataset`, or with ``unpaired=True`` a :class:`KTODataset`.
    """
    cmap = resolve_column_map(
        column_map,
        ("prompt", "chosen", "rejected", "score_chosen", "score_rejected"),
        "ultrafeedback_binarized_dataset",
    )
    split = _split_for(source, split, "train_prefs", load_dataset_kwargs)
    raw = load_rows(source, split=split, **load_dataset_kwargs)

    def convert(row, where):
        convs = {}
        for side in ("chosen", "rejected"):
            conv = _message_list(_column(row, cmap[side], where), cmap[side], where)
            if conv and all(m["role"] == "assistant" for m in conv):
                conv = prompt_messages(row, cmap["prompt"], where) + conv
            _check_final_answer(conv, cmap[side])
            convs[side] = conv
        _shared_prefix(convs["chosen"], convs["rejected"])
        if drop_ties:
            sc, sr = row.get(cmap["score_chosen"]), row.get(cmap["score_rejected"])
            if sc is not None and sr is not None and sc == sr:
                raise _Skip("tied_scores", f"score_chosen == score_rejected == {sc}")
        return convs

    norm, counters = _normalise(raw, convert, "ultrafeedback_binarized_dataset")
    return _paired_result(
        norm,
        counters,
        tokenizer,
        unpaired=unpaired,
        train_on_input=train_on_input,
        new_system_prompt=new_system_prompt,
        max_seq_len=max_seq_len,
        what="ultrafeedback_binarized_dataset",
    )


# --------------------------------------------------------------------------- StackExchange


def stack_exchange_paired_dataset(
    tokenizer,
    *,
    source: str = STACK_EXCHANGE_PAIRED,
    column_map: Optional[Dict[str, str]] = None,
    split: Optional[str] = None,
    unpaired: bool = False,
    train_on_input: bool = False,
    new_system_prompt: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    **load_dataset_kwargs: Any,
) -> Union[PreferenceDataset, KTODataset]:
    """StackExchange answer pairs (``lvwerra/stack-exchange-paired``, the TRL StackLLaMA data).

    Columns: ``question`` (the prompt, one user message), ``response_j`` (the better
    answer: more votes / accepted) and ``response_k`` (the worse one); ``column_map`` keys
    are ``prompt``, ``chosen``, ``rejected``. The upstream set is large (~10M pairs):
    pick a folder with ``data_dir="data/rl"`` (or ``data/finetune``, ``data/evaluation``)
    and a slice with ``split="train[:20000]"``. Empty questions/answers are dropped and
    counted.

    Returns a :class:`PreferenceDataset`, or with ``unpaired=True`` a :class:`KTODataset`.
    """
    defaults = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    resolve_column_map(
        column_map, tuple(defaults), "stack_exchange_paired_dataset"
    )  # validates keys
    cmap = {**defaults, **dict(column_map or {})}
    split = _split_for(source, split, "train", load_dataset_kwargs)
    raw = load_rows(source, split=split, **load_dataset_kwargs)

    def convert(row, where):
        q = _column(row, cmap["prompt"], where)
        if not isinstance(q, str):
            raise row_error(where, cmap["prompt"], f"must be a string, got {type(q).__name__}")
        if not q.strip():
            raise _Skip("empty_prompt", f"{cmap['prompt']} is empty")
        out = {}
        for side in ("chosen", "rejected"):
            a = _column(row, cmap[side], where)
            if not isinstance(a, str):
                raise row_error(where, cmap[side], f"must be a string, got {type(a).__name__}")
            if not a.strip():
                raise _Skip("empty_answer", f"{cmap[side]} is empty")
            out[side] = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if out["chosen"][-1]["content"].strip() == out["rejected"][-1]["content"].strip():
            raise _Skip("identical", "the two answers are identical")
        return out

    norm, counters = _normalise(raw, convert, "stack_exchange_paired_dataset")
    return _paired_result(
        norm,
        counters,
        tokenizer,
        unpaired=unpaired,
        train_on_input=train_on_input,
        new_system_prompt=new_system_prompt,
        max_seq_len=max_seq_len,
        what="stack_exchange_paired_dataset",
    )


# --------------------------------------------------------------------------- thumbs (KTO)

_UP = {"up", "thumbs_up", "thumbs up", "thumbsup", "+1", "\U0001f44d", "true", "desirable"}
_DOWN = {
    "down",
    "thumbs_down",
    "thumbs down",
    "thumbsdown",
    "-1",
    "\U0001f44e",
    "false",
    "undesirable",
}


def thumbs_label(value: Any) -> bool:
    """Thumbs feedback -> desirable (True) / undesirable (False).

    Accepts bools, the integers 1/0 (and +1/-1), and the strings ``"up"``/``"down"``
    (case-insensitive; also ``"thumbs_up"``, ``"👍"``/``"👎"``, ``"true"``/``"false"``).
    Raises ``ValueError`` for anything else.
    """
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    if isinstance(value, int) and value in (1, 0, -1):
        return value == 1
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _UP:
            return True
        if v in _DOWN:
            return False
    raise ValueError(f"must be 'up'/'down' or a bool, got {value!r}")


def thumbs_dataset(
    tokenizer,
    *,
    source: str,
    column_map: Optional[Dict[str, str]] = None,
    split: Optional[str] = None,
    new_system_prompt: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    **load_dataset_kwargs: Any,
) -> KTODataset:
    """Unpaired thumbs-up/down feedback for KTO (one completion per row).

    Columns: ``prompt`` (string or message list), ``completion`` (string, or a message
    list ending in the assistant answer) and the feedback in ``label`` or, if there is no
    ``label`` column, ``thumbs``: ``"up"``/``"down"``, a bool, or 1/0 (see
    :func:`thumbs_label`). ``column_map`` keys: ``prompt``, ``completion``, ``label``.
    An unknown feedback value is a one-line error naming the row (it would silently flip
    the training signal otherwise); rows with an empty completion are dropped and counted.
    The result is checked for both classes; the recipe warns when
    ``desirable_weight·n_D / (undesirable_weight·n_U)`` is outside the KTO paper's [1, 4/3].
    """
    cmap = resolve_column_map(column_map, ("prompt", "completion", "label"), "thumbs_dataset")
    split = _split_for(source, split, "train", load_dataset_kwargs)
    raw = load_rows(source, split=split, **load_dataset_kwargs)
    label_col = cmap["label"]
    if not (column_map and "label" in column_map) and raw.rows and "label" not in raw.rows[0]:
        label_col = "thumbs"

    def convert(row, where):
        try:
            label = thumbs_label(_column(row, label_col, where))
        except ValueError as e:
            raise row_error(where, label_col, str(e)) from None
        completion = _column(row, cmap["completion"], where)
        if isinstance(completion, str) and not completion.strip():
            raise _Skip("empty_completion", f"{cmap['completion']} is empty")
        out = {"completion": completion, "label": label}
        for key in ("prompt", "tools"):  # the conversation's shape is kto_from_raw's to read
            if row.get(cmap.get(key, key)) is not None:
                out[key] = row[cmap.get(key, key)]
        return out

    norm, counters = _normalise(raw, convert, "thumbs_dataset")
    max_len = resolve_max_seq_len(tokenizer, max_seq_len)
    ds = kto_from_raw(norm, tokenizer, None, new_system_prompt, max_len)
    ds.stats = {**ds.stats, **counters, "rows": ds.stats["rows"] + sum(counters.values())}
    return ds
