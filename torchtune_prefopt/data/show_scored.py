"""What a run scores: one dataset row rendered with its scored tokens marked.

    python -m torchtune_prefopt.data.show_scored --config <config> [key=value ...] [--row N]
        [--dataset eval_dataset]

Builds the config's tokenizer and dataset exactly as the recipe does (no model is loaded) and
prints, for dataset item ``N`` (default 0), each sequence's text with every token that enters
the log-probs between ``[[`` and ``]]``: the assistant messages of the completion (content and
end-of-turn), nothing of the prompt, the role headers or the user/tool turns in between. A bad
config or row is the recipe's one ``error:`` line (exit 2).
"""

from __future__ import annotations

import itertools
import sys
from typing import Any, List, Optional, Sequence, Tuple

from torchtune_prefopt.data._common import CROSS_ENTROPY_IGNORE_IDX, decode_text
from torchtune_prefopt.errors import PrefOptUserError, report_user_errors

OPEN, CLOSE = "[[", "]]"


def marked_text(tokenizer: Any, ids: Sequence[int], labels: Sequence[int]) -> Tuple[str, int, int]:
    """``(text, scored tokens, spans)``: ``ids`` decoded run by run, scored runs (``labels`` not
    -100) wrapped in ``[[ ]]``."""
    out, spans = [], 0
    pairs = zip(ids, (lab != CROSS_ENTROPY_IGNORE_IDX for lab in labels))
    for scored, run in itertools.groupby(pairs, key=lambda p: p[1]):
        text = decode_text(tokenizer, [int(i) for i, _ in run], skip_special_tokens=False)
        out.append(f"{OPEN}{text}{CLOSE}" if scored else text)
        spans += scored
    n = sum(lab != CROSS_ENTROPY_IGNORE_IDX for lab in labels)
    return "".join(out), n, spans


def item_sequences(item: dict) -> List[Tuple[str, List[int], List[int]]]:
    """``(name, ids, labels)`` of a paired item (chosen, rejected) or an unpaired one."""
    if "chosen_input_ids" in item:
        return [
            (side, list(item[f"{side}_input_ids"]), list(item[f"{side}_labels"]))
            for side in ("chosen", "rejected")
        ]
    from torchtune_prefopt.data._batch import completion_labels

    prompt = list(item["prompt_ids"])
    name = "completion (desirable)" if item.get("label") else "completion (undesirable)"
    labels = [CROSS_ENTROPY_IGNORE_IDX] * len(prompt) + completion_labels(item)
    return [(name, prompt + list(item["completion_ids"]), labels)]


def _flag(argv: List[str], name: str, default: Optional[str]) -> Tuple[Optional[str], List[str]]:
    if name not in argv:
        return default, argv
    i = argv.index(name)
    if i + 1 >= len(argv):
        raise PrefOptUserError(f"{name} needs a value")
    return argv[i + 1], argv[:i] + argv[i + 2 :]


@report_user_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    from torchtune_prefopt._config import load_config
    from torchtune_prefopt.data.dataset_checks import build_datasets, build_tokenizer

    args = list(sys.argv[1:] if argv is None else argv)
    row, args = _flag(args, "--row", "0")
    key, args = _flag(args, "--dataset", "dataset")
    if not row.isdigit():
        raise PrefOptUserError(f"--row must be a row number (0, 1, ...), got {row!r}")
    cfg = load_config(args, prog="python -m torchtune_prefopt.data.show_scored")
    if key not in ("dataset", "eval_dataset") or cfg.get(key) is None:
        raise PrefOptUserError(f"--dataset {key}: the config has no such dataset")
    tokenizer = build_tokenizer(cfg.tokenizer, None)
    ds = build_datasets(cfg[key], key, tokenizer)
    n = int(row)
    if n >= len(ds):
        raise PrefOptUserError(f"--row {n}: {key} has {len(ds)} usable rows (0..{len(ds) - 1})")
    source = getattr(ds, "source_rows", None)
    where = f" (source row {source[n]})" if source is not None else ""
    print(f"{key} item {n}{where}; scored tokens between {OPEN} and {CLOSE}:")
    for name, ids, labels in item_sequences(ds[n]):
        text, scored, spans = marked_text(tokenizer, ids, labels)
        print(f"--- {name}: {scored} of {len(ids)} tokens scored, in {spans} span(s)")
        print(text)
    return 0


if __name__ == "__main__":
    main()
