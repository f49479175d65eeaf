"""The recipe's datasets: built from their config nodes, and checked against the loss and the
model before any weights load (one ``error:`` line naming the config key and the row)."""

from __future__ import annotations

from typing import Any, Optional

from torchtune_prefopt.data._batch import is_paired_row
from torchtune_prefopt.data._common import HF_TOKENIZER_HINT
from torchtune_prefopt.errors import PrefOptUserError

__all__ = [
    "build_datasets",
    "build_tokenizer",
    "check_dataset_kind",
    "check_fits_context",
    "check_tokenizer_fits",
]


def build_tokenizer(node: Any, vocab_size: Optional[int]) -> Any:
    """The ``tokenizer`` component, checked to be usable: it loads (a tokenizer over the wrong
    kind of file, e.g. ``llama3_tokenizer`` on a ``tokenizer.json``, is one line, not
    tiktoken's traceback), it has a ``pad_id``, and its special ids are rows of the model's
    embedding (:func:`check_tokenizer_fits`). Whether it renders conversations is checked
    where that is needed, by the text datasets (``data._common.tokenize_split``)."""
    from torchtune import config

    target = node.get("_component_", "?") if hasattr(node, "get") else "?"
    try:
        tokenizer = config.instantiate(node)
    except PrefOptUserError:
        raise
    except Exception as err:  # noqa: BLE001 - any loader failure is a bad file or argument
        msg = " ".join(str(err).split())[:240]
        raise PrefOptUserError(
            f"tokenizer: {target} could not be built ({type(err).__name__}: {msg}); {HF_TOKENIZER_HINT}"
        ) from err
    if not isinstance(getattr(tokenizer, "pad_id", None), int):
        raise PrefOptUserError(
            f"tokenizer: {type(tokenizer).__name__} ({target}) has no integer pad_id; {HF_TOKENIZER_HINT}"
        )
    check_tokenizer_fits(tokenizer, vocab_size)
    return tokenizer


def build_datasets(node: Any, key: str, tokenizer: Any):
    """``config.instantiate(node, tokenizer=tokenizer)``; a list of builders is concatenated
    (torchtune's ``ConcatDataset``) and must yield one row kind. A builder's ``ValueError``,
    ``FileNotFoundError``, ``KeyError`` or ``TypeError`` is one line naming ``key``."""
    from omegaconf import ListConfig
    from torchtune import config

    try:
        if not isinstance(node, ListConfig):
            return config.instantiate(node, tokenizer=tokenizer)
        from torchtune.datasets import ConcatDataset

        parts = [config.instantiate(c, tokenizer=tokenizer) for c in node]
        kinds = [(i, is_paired_row(p[0])) for i, p in enumerate(parts) if len(p)]
        odd = [(i, k) for i, k in kinds if k != kinds[0][1]]
        if odd:
            name = {True: "paired", False: "unpaired"}
            raise PrefOptUserError(
                f"{key}[{odd[0][0]}]: yields {name[odd[0][1]]} rows but {key}[{kinds[0][0]}] yields "
                f"{name[kinds[0][1]]} ones; one run trains on one row kind (wrap paired data with "
                "torchtune_prefopt.data.unpaired_from_paired for KTO)"
            )
        return ConcatDataset(parts)
    except PrefOptUserError as err:
        if str(err).startswith(key):
            raise
        # every data error names the dataset key it is about (dataset or eval_dataset)
        named = f"{key}: {' '.join(str(err).split())}"
        try:  # the same kind of error (a DataRowError stays one)
            renamed = type(err)(named)
        except TypeError:
            renamed = PrefOptUserError(named)
        raise renamed from err
    except (ValueError, FileNotFoundError, KeyError, TypeError) as err:
        msg = " ".join(str(err).split())
        raise PrefOptUserError(f"{key}: {msg}") from err


def check_dataset_kind(ds, key: str, paired: bool) -> None:
    """``ds`` has rows, of the kind the loss trains on (evaluation: paired)."""
    if len(ds) == 0:
        raise PrefOptUserError(f"{key}: no usable rows")
    is_paired = is_paired_row(ds[0])
    if paired and not is_paired:
        raise PrefOptUserError(
            f"{key}: this loss (or evaluation) needs paired chosen/rejected rows, but the dataset yields unpaired rows"
        )
    if not paired and is_paired:
        raise PrefOptUserError(
            f"{key}: KTO trains on unpaired rows; wrap paired data with "
            "torchtune_prefopt.data.unpaired_from_paired (chosen -> desirable, rejected -> undesirable)"
        )


def _token_lists(item) -> tuple:
    if is_paired_row(item):
        return item["chosen_input_ids"], item["rejected_input_ids"]
    return item["prompt_ids"], item["completion_ids"]


def check_tokenizer_fits(tokenizer: Any, vocab_size: Optional[int]) -> None:
    """The tokenizer's special ids (padding, BOS, EOS, its special-token table) are rows of
    the model's embedding (``vocab_size`` rows)."""
    if not vocab_size:
        return
    ids = {name: getattr(tokenizer, name, None) for name in ("pad_id", "bos_id", "eos_id")}
    special = getattr(tokenizer, "special_tokens", None)
    if isinstance(special, dict) and special:
        name, top = max(special.items(), key=lambda kv: kv[1])
        ids[f"special token {name!r}"] = top
    for name, value in ids.items():
        if isinstance(value, int) and not 0 <= value < vocab_size:
            raise PrefOptUserError(
                f"tokenizer: its {name} is {value}, but the model's embedding has {vocab_size} "
                "rows (ids 0.."
                f"{vocab_size - 1}): the tokenizer does not belong to this model (check "
                "model.vocab_size and tokenizer's files)"
            )


def check_fits_context(
    ds, key: str, context: Optional[int], vocab_size: Optional[int] = None
) -> None:
    """Every sequence the model will see fits its context (``model.max_seq_len``): each row,
    and for KTO the KL rows (a prompt with another row's completion); and with
    ``vocab_size``, every token id is a row of the model's embedding."""
    lengths, prompts, completions = [], [], []
    for i in range(len(ds)):
        item = ds[i]
        first, second = _token_lists(item)
        if vocab_size:
            top = max(max(first, default=0), max(second, default=0))
            low = min(min(first, default=0), min(second, default=0))
            if top >= vocab_size or low < 0:
                bad = top if top >= vocab_size else low
                raise PrefOptUserError(
                    f"{key}: row {i} has token id {bad}, outside the model's vocabulary of "
                    f"{vocab_size} (ids 0..{vocab_size - 1}): the tokenizer does not belong "
                    "to this model"
                )
        if is_paired_row(item):
            lengths.append(max(len(first), len(second)))
        else:
            prompts.append(len(first))
            completions.append(len(second))
            lengths.append(prompts[-1] + completions[-1])
    if not context:
        return
    fix = f"set tokenizer.max_seq_len (or the dataset's max_seq_len) to at most {context}"
    for i, n in enumerate(lengths):
        if n > context:
            raise PrefOptUserError(
                f"{key}: row {i} has {n} tokens, more than the model's context of {context} tokens "
                f"(the model's max_seq_len); {fix}"
            )
    kl_longest = max(prompts) + max(completions) if prompts else 0
    limit = getattr(ds, "max_seq_len", None)
    if kl_longest > context and (limit is None or limit > context):
        raise PrefOptUserError(
            f"{key}: KTO's KL rows (a prompt with another row's completion) can reach {kl_longest} "
            f"tokens, more than the model's context of {context}; {fix}"
        )
