"""Tables of the comparison report (held-out, generation, training, set-up), each as a head
and rows that :func:`md_table` / :func:`html_table` render."""

from __future__ import annotations

import html
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "generation_table",
    "heldout_table",
    "html_table",
    "md_table",
    "rows_for",
    "setup_lines",
    "training_table",
]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int,)) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}"
    return str(v)


def _pm(v: Optional[float], se: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if se is None or (isinstance(se, float) and math.isnan(se)):
        return _fmt(v)
    return f"{_fmt(v)} ± {_fmt(se)}"


def rows_for(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Reference first, then each run."""
    return [report["reference"]] + list(report["runs"])


def heldout_table(report) -> Tuple[List[str], List[List[str]]]:
    head = [
        "model",
        "loss",
        "pref. acc. (own reward)",
        "reward margin (own units)",
        "margin improved vs ref",
        "margin gain (nats)",
        "ranking acc. (sum logp)",
        "ranking acc. (per token)",
        "Δ logp chosen",
        "Δ logp rejected",
        "chosen logp fell",
    ]
    rows = []
    for r in rows_for(report):
        h = r["result"]["heldout"]
        rows.append(
            [
                r["name"],
                r.get("loss_label", "—"),
                _fmt(h.get("rewards/accuracies")),
                _fmt(h.get("rewards/margins")),
                _fmt(h.get("margin_improved")),
                _fmt(h.get("margin_gain")),
                _fmt(h.get("logps/accuracies")),
                _fmt(h.get("logps/accuracies_per_token")),
                _fmt(h.get("chosen_logp_drift")),
                _fmt(h.get("rejected_logp_drift")),
                _fmt(h.get("chosen_logp_fell")),
            ]
        )
    return head, rows


def generation_table(report) -> Tuple[List[str], List[List[str]]]:
    head = [
        "model",
        "KL(π‖π_ref) ± s.e. (nats)",
        "response length (tokens)",
        "length ratio vs ref",
        "cut at max_new_tokens",
        "judge win rate vs ref",
    ]
    scores = any("judge_mean_score" in r["result"]["generation"] for r in rows_for(report))
    if scores:
        head.append("judge mean score")
    rows = []
    for r in rows_for(report):
        g, k = r["result"]["generation"], r["result"].get("kl", {})
        is_ref = r is report["reference"]
        kl = "0 (itself)" if is_ref else _pm(k.get("kl"), k.get("kl_stderr"))
        row = [
            r["name"],
            kl,
            _fmt(g.get("response_length"), 2),
            _fmt(g.get("length_ratio")),
            _fmt(g.get("hit_max_new_tokens")),
            "—" if is_ref else _fmt(g.get("win_rate")),
        ]
        if scores:
            row.append(_fmt(g.get("judge_mean_score")))
        rows.append(row)
    return head, rows


def training_table(report) -> Tuple[List[str], List[List[str]]]:
    head = [
        "run",
        "optimizer steps",
        "final train loss",
        "final train reward acc.",
        "first → last in-training eval acc.",
        "metrics log (DiskLogger)",
    ]
    rows = []
    for r in report["runs"]:
        t = r.get("training", {})
        ev = t.get("eval_accuracy")
        evs = (
            f"{_fmt(ev[0][1])} (step {ev[0][0]}) → {_fmt(ev[-1][1])} (step {ev[-1][0]})"
            if ev
            else "—"
        )
        rows.append(
            [
                r["name"],
                _fmt(t.get("steps")),
                _fmt(t.get("final_loss")),
                _fmt(t.get("final_reward_accuracy")),
                evs,
                ", ".join(f"`{f}`" for f in r.get("log_files", [])) or "—",
            ]
        )
    return head, rows


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c)).replace('`', '')}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


# --------------------------------------------------------------------------- report


def _one(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return str(v[0])
        return "/".join(str(x) for x in v) if v else "?"
    return str(v)


def setup_lines(report) -> List[str]:
    s = report["settings"]
    lines = [
        f"- base training config: `{s['base_config']}` (`{s['base_config_file']}`), overrides for every run: "
        f"`{' '.join(s.get('overrides') or []) or '(none)'}`",
        f"- matched: same base weights (`{s.get('base_checkpoint')}`), seed {s.get('seed')}, "
        f"{_one(s.get('steps_per_run'))} optimizer steps per run, {_one(s.get('completions_per_step'))} completions "
        "(chosen + rejected, or KTO rows) per step, "
        f"same optimizer and lr schedule"
        + ("" if report["matched"]["ok"] else " — **NOT matched, see below**"),
        f"- reference model: `{s.get('reference_checkpoint')}` (the weights every run starts from; KL, drift and "
        "win rates are measured against it)",
        f"- held-out set: {s['heldout_rows']} pairs / {s['heldout_prompts']} prompts from `{s['heldout_dataset']}`",
        f"- generation: {s['generation']}; KL: {s['kl']}",
        f"- judge: {s.get('judge') or 'none (set compare.judge._component_)'}",
    ]
    return lines


# --------------------------------------------------------------------------- assembling
