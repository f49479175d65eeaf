"""Write the comparison report: ``report.md``, ``report.html``, ``report.json`` and plots.

The input is one JSON-able dict (see :func:`write_report`); every number in the tables comes
from it, and it names the file each number was read from or written to (the runs' DiskLogger
logs for training numbers; the comparison's own DiskLogger-format ``eval/<run>/metrics.txt``
and per-row JSONL files for held-out and generation numbers).

Training curves are PNG files (matplotlib, Agg backend) when matplotlib is installed; the
HTML report always embeds the same curves as inline SVG (no dependency), so it is complete
either way. ``report.json`` holds everything, including the raw curves.
"""

from __future__ import annotations

import html
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torchtune_prefopt.compare.frontier import (
    aggregate_seeds,
    frontier_points,
    frontier_reading,
    frontier_table,
    plot_frontier,
)
from torchtune_prefopt.compare.metrics import DEFINITIONS, TRAIN_CURVE_METRICS
from torchtune_prefopt.compare.runs import loss_label, matched_differences

__all__ = [
    "assemble_report",
    "matplotlib_available",
    "plot_curves",
    "run_record",
    "svg_chart",
    "training_summary",
    "write_eval_files",
    "write_report",
]

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _slug(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", metric).strip("_")


def _curve_metrics(curves: Dict[str, Dict[str, List[Tuple[int, float]]]]) -> List[str]:
    present = {m for run in curves.values() for m in run}
    ordered = [m for m in TRAIN_CURVE_METRICS if m in present]
    return ordered


def plot_curves(curves: Dict[str, Dict[str, List[Tuple[int, float]]]], plot_dir) -> List[Path]:
    """One PNG per metric (one line per run) in ``plot_dir``; ``[]`` without matplotlib."""
    if not matplotlib_available():
        return []
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in _curve_metrics(curves):
        fig, ax = plt.subplots(figsize=(5.0, 3.2), dpi=100)
        for k, (run, series) in enumerate(curves.items()):
            pts = series.get(metric)
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(
                xs,
                ys,
                label=run,
                color=_COLORS[k % len(_COLORS)],
                marker="o" if len(xs) < 12 else None,
                ms=3,
            )
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = plot_dir / f"{_slug(metric)}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def svg_chart(
    metric: str,
    curves: Dict[str, Dict[str, List[Tuple[int, float]]]],
    width: int = 420,
    height: int = 240,
) -> str:
    """A small dependency-free SVG line chart of ``metric`` for every run."""
    series = [
        (run, [(x, y) for x, y in s.get(metric, []) if math.isfinite(y)])
        for run, s in curves.items()
    ]
    pts = [p for _, s in series for p in s]
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    left, right, top, bottom = 56, 10, 22, 30
    W, H = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - x0) / (x1 - x0) * W

    def sy(y):
        return top + (1 - (y - y0) / (y1 - y0)) * H

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="10">',
        f'<text x="{width / 2}" y="14" text-anchor="middle" font-size="12">{html.escape(metric)}</text>',
        f'<rect x="{left}" y="{top}" width="{W}" height="{H}" fill="none" stroke="#999"/>',
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{y1:.4g}</text>',
        f'<text x="{left - 4}" y="{top + H}" text-anchor="end">{y0:.4g}</text>',
        f'<text x="{left}" y="{top + H + 14}">{x0}</text>',
        f'<text x="{left + W}" y="{top + H + 14}" text-anchor="end">{x1}</text>',
        f'<text x="{left + W / 2}" y="{top + H + 26}" text-anchor="middle">step</text>',
    ]
    for k, (run, s) in enumerate(series):
        if not s:
            continue
        color = _COLORS[k % len(_COLORS)]
        poly = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{poly}"/>')
        if len(s) == 1:
            out.append(
                f'<circle cx="{sx(s[0][0]):.1f}" cy="{sy(s[0][1]):.1f}" r="2.5" fill="{color}"/>'
            )
        out.append(
            f'<text x="{left + 6}" y="{top + 12 + 11 * k}" fill="{color}">{html.escape(run)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)


# --------------------------------------------------------------------------- tables


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


def _rows_for(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Reference first, then each run."""
    return [report["reference"]] + list(report["runs"])


def _heldout_table(report) -> Tuple[List[str], List[List[str]]]:
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
    for r in _rows_for(report):
        h = r["result"]["heldout"]
        rows.append(
            [
                r["name"],
                r.get("loss_label", "—"),
                _fmt(h.get("pref_accuracy")),
                _fmt(h.get("reward_margin")),
                _fmt(h.get("margin_improved")),
                _fmt(h.get("margin_gain")),
                _fmt(h.get("ranking_accuracy")),
                _fmt(h.get("ranking_accuracy_per_token")),
                _fmt(h.get("chosen_logp_drift")),
                _fmt(h.get("rejected_logp_drift")),
                _fmt(h.get("chosen_logp_fell")),
            ]
        )
    return head, rows


def _generation_table(report) -> Tuple[List[str], List[List[str]]]:
    head = [
        "model",
        "KL(π‖π_ref) ± s.e. (nats)",
        "response length (tokens)",
        "length ratio vs ref",
        "cut at max_new_tokens",
        "judge win rate vs ref",
    ]
    scores = any("judge_mean_score" in r["result"]["generation"] for r in _rows_for(report))
    if scores:
        head.append("judge mean score")
    rows = []
    for r in _rows_for(report):
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


def _training_table(report) -> Tuple[List[str], List[List[str]]]:
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


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
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


def _setup_lines(report) -> List[str]:
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


def _flat(prefix: str, d: Dict[str, Any]) -> Dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}/{k}"] = float(v)
    return out


def write_eval_files(out_dir: Path, name: str, result: Dict[str, Any], step: int) -> Dict[str, str]:
    """The comparison's own numbers of one model as ``<out_dir>/eval/<name>/metrics.txt`` (a
    DiskLogger file) and per-row JSONL files; removes ``result["rows"]``; returns the paths."""
    from torchtune.training.metric_logging import DiskLogger

    d = out_dir / "eval" / name
    d.mkdir(parents=True, exist_ok=True)
    metrics_file = d / "metrics.txt"
    if metrics_file.exists():
        metrics_file.unlink()
    logger = DiskLogger(log_dir=str(d), filename="metrics.txt")
    payload = {}
    payload.update(_flat("heldout", result["heldout"]))
    payload.update(_flat("generation", result["generation"]))
    payload.update(_flat("kl", result.get("kl", {})))
    logger.log_dict(payload, step=step)
    logger.close()
    files = {"metrics": str(metrics_file)}
    for key, rows in result.pop("rows").items():  # per-row details live in the JSONL files only
        if not rows:
            continue
        p = d / f"{key}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        files[key] = str(p)
    return files


def training_summary(curves: Dict[str, list], state: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Steps, final loss and reward accuracy, and the held-out accuracy curve of one run."""

    def last(name):
        s = curves.get(name)
        return s[-1][1] if s else None

    steps = state.get("step") if state else None
    if steps is None and curves.get("loss"):
        steps = int(curves["loss"][-1][0])
    return {
        "steps": steps,
        "final_loss": last("loss"),
        "final_reward_accuracy": last("rewards/accuracies"),
        "eval_accuracy": curves.get("eval/rewards/accuracies", []),
    }


def run_record(
    run,
    saved_cfg: Dict[str, Any],
    loss_fn,
    final: Path,
    state: Optional[Dict[str, Any]],
    result: Dict[str, Any],
    curves: Dict[str, list],
    log_files: Sequence[Path],
    eval_files: Dict[str, str],
) -> Dict[str, Any]:
    """One run's entry in the report: where it came from (command, config, checkpoint, logs),
    its training summary, its evaluation ``result``, and its matching keys."""
    train = training_summary(curves, state)
    per_step = None
    if state:
        rows = state["batch_size"] * state["world_size"] * state["gradient_accumulation_steps"]
        per_step = rows * (2 if getattr(loss_fn, "paired", True) else 1)
    loss_cfg = saved_cfg.get("loss")
    return {
        "name": run.name,
        "family": getattr(run, "family", None) or run.name,
        "strength": getattr(run, "strength", None),
        "seed": getattr(run, "seed", None),
        "loss_label": loss_label(loss_cfg),
        "loss_config": loss_cfg,
        "run_dir": str(run.run_dir),
        "command": run.shell,
        "checkpoint": str(final),
        "log_files": [str(f) for f in log_files],
        "training": train,
        "recipe_state": {
            k: state[k]
            for k in ("step", "world_size", "batch_size", "gradient_accumulation_steps", "seed")
            if state and k in state
        },
        "completions_per_step": per_step,
        "result": result,
        "files": {
            "training log": ", ".join(str(f) for f in log_files) or "(no DiskLogger log)",
            **eval_files,
            "config": str(run.run_dir / "torchtune_config.yaml"),
            "checkpoint": str(final),
        },
        "config": saved_cfg,
        "curves": curves,
    }


def assemble_report(
    *,
    title: str,
    output_dir: Path,
    settings: Dict[str, Any],
    reference: Dict[str, Any],
    runs: Sequence[Dict[str, Any]],
) -> Dict[str, Any]:
    """The report dict :func:`write_report` renders: ``settings`` (what the comparison did) plus
    what all runs share, the matching check, the reference's and every run's entries
    (:func:`run_record`), and the training curves."""
    configs = {r["name"]: r.pop("config") for r in runs}
    curves = {r["name"]: r.pop("curves") for r in runs}
    steps = {r["name"]: r["training"]["steps"] for r in runs}
    per_step = {r["name"]: r.pop("completions_per_step") for r in runs}
    seeded = any(r.get("seed") is not None for r in runs)
    diffs = matched_differences(configs, steps, per_step, ignore=("seed",) if seeded else ())
    first = next(iter(configs.values()))
    from omegaconf import OmegaConf

    base_checkpoint = OmegaConf.select(
        OmegaConf.create(first), "checkpointer.checkpoint_dir", default="?"
    )
    report = {
        "title": title,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "output_dir": str(output_dir),
        "settings": {
            "base_config": settings.pop("base_config"),
            "base_config_file": settings.pop("base_config_file"),
            "overrides": settings.pop("overrides"),
            "base_checkpoint": str(base_checkpoint),
            "reference_checkpoint": reference["checkpoint"],
            "seed": sorted({c.get("seed") for c in configs.values()})
            if seeded
            else first.get("seed"),
            "steps_per_run": sorted({s for s in steps.values() if s is not None}),
            "completions_per_step": sorted({s for s in per_step.values() if s is not None}),
            **settings,
        },
        "matched": {"ok": not diffs, "differences": diffs},
        "reference": {"name": "reference", "loss_label": "— (base weights)", **reference},
        "runs": list(runs),
        "curves": curves,
        "notes": [],
    }
    per_run = frontier_points(report)
    if len(per_run) > 1:
        points = aggregate_seeds(per_run)
        report["frontier"] = {"points": points, "reading": frontier_reading(points)}
        if seeded:
            report["frontier"]["runs"] = per_run
    return report


# --------------------------------------------------------------------------- writing


def write_report(report: Dict[str, Any], output_dir) -> Dict[str, Path]:
    """Write report.{md,html,json} and plots/*.png into ``output_dir``; returns their paths.

    ``report`` keys: ``title``, ``settings`` (dict), ``matched`` (``{"ok", "differences"}``),
    ``reference`` and ``runs`` (each ``{"name", "loss_label", "result", "files", ...}``, runs
    also ``log_files``, ``training``, ``command``, ``run_dir``, ``checkpoint``), ``curves``
    (``{run: {metric: [[step, value], ...]}}``) and ``notes`` (list of str).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = {
        k: {m: [tuple(p) for p in v] for m, v in c.items()}
        for k, c in report.get("curves", {}).items()
    }
    pngs = plot_curves(curves, out / "plots")
    report["plots"] = [str(p.relative_to(out)) for p in pngs]
    if not pngs:
        report.setdefault("notes", []).append(
            "PNG plots skipped: matplotlib is not installed (`pip install matplotlib`); report.html embeds the "
            "curves as SVG and report.json holds the raw series."
        )

    frontier = report.get("frontier")
    frontier_md: List[str] = []
    frontier_html = ""
    if frontier:
        png = plot_frontier(frontier["points"], out / "plots" / "frontier.png")
        fh, fr = frontier_table(frontier["points"])
        reading = list(frontier["reading"]["lines"])
        seeds = sorted({x for p in frontier["points"] for x in p.get("seeds") or []})
        if seeds:
            reading.insert(
                0,
                f"Each point averages training seeds {seeds}; its +- is the seed-to-seed standard "
                "error (never below the pooled sampling error); per-seed runs are in report.json.",
            )
        img = f"![gold-reward frontier]({png.relative_to(out).as_posix()})" if png else ""
        frontier_md = [
            "## Gold-reward frontier (reward vs KL)",
            "",
            *([img, ""] if img else []),
            *[f"- {line}" for line in reading],
            "",
            _md_table(fh, fr),
            "",
        ]
        frontier_html = (
            "<h2>Gold-reward frontier (reward vs KL)</h2>"
            + (f'<img src="plots/{png.name}" alt="frontier">' if png else "")
            + "<ul>"
            + "".join(f"<li>{html.escape(line).replace('**', '')}</li>" for line in reading)
            + "</ul>"
            + _html_table(fh, fr)
        )

    ht, hr = _heldout_table(report)
    gt, gr = _generation_table(report)
    tt, tr = _training_table(report)
    title = report.get("title", "Preference-loss comparison")

    md = [f"# {title}", "", *_setup_lines(report), ""]
    if not report["matched"]["ok"]:
        md += [
            "**Runs are not matched:**",
            *[f"- {d}" for d in report["matched"]["differences"]],
            "",
        ]
    md += frontier_md
    md += [
        "## Held-out preference metrics (log-probs)",
        "",
        _md_table(ht, hr),
        "",
        "## Generation, length and KL",
        "",
        _md_table(gt, gr),
        "",
        "## Training (read from each run's DiskLogger log)",
        "",
        _md_table(tt, tr),
        "",
        "## Training curves",
        "",
    ]
    if pngs:
        md += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in pngs] + [""]
    else:
        md += ["(no PNG: matplotlib is not installed; see report.html)", ""]
    md += ["## Definitions", ""] + [f"- **{k}**: {v}" for k, v in DEFINITIONS.items()] + [""]
    md += ["## Where every number comes from", ""]
    for r in _rows_for(report):
        files = r.get("files", {})
        md.append(f"- **{r['name']}**: " + "; ".join(f"{k}: `{v}`" for k, v in files.items()))
        if r.get("command"):
            md.append(f"  - trained by: `{r['command']}`")
    for note in report.get("notes", []):
        md.append(f"- note: {note}")
    md_text = "\n".join(md) + "\n"

    charts = []
    for metric in _curve_metrics(curves):
        png = out / "plots" / f"{_slug(metric)}.png"
        if png.exists():
            charts.append(f'<img src="plots/{png.name}" alt="{html.escape(metric)}">')
        else:
            charts.append(svg_chart(metric, curves))
    files_html = "".join(
        f"<li><b>{html.escape(r['name'])}</b>: "
        + "; ".join(
            f"{html.escape(k)}: <code>{html.escape(str(v))}</code>"
            for k, v in r.get("files", {}).items()
        )
        + (f"<br>trained by: <code>{html.escape(r['command'])}</code>" if r.get("command") else "")
        + "</li>"
        for r in _rows_for(report)
    )
    setup_html = "".join(
        f"<li>{html.escape(line[2:]).replace('`', '')}</li>" for line in _setup_lines(report)
    )
    diffs = (
        ""
        if report["matched"]["ok"]
        else (
            "<p><b>Runs are not matched:</b></p><ul>"
            + "".join(f"<li>{html.escape(d)}</li>" for d in report["matched"]["differences"])
            + "</ul>"
        )
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.get("notes", []))
    html_text = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;}} table{{border-collapse:collapse;margin:1em 0;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}} td:first-child,th:first-child{{text-align:left}}
.charts svg,.charts img{{margin:4px;border:1px solid #eee}} code{{font-size:12px}}</style></head><body>
<h1>{html.escape(title)}</h1><ul>{setup_html}</ul>{diffs}{frontier_html}
<h2>Held-out preference metrics (log-probs)</h2>{_html_table(ht, hr)}
<h2>Generation, length and KL</h2>{_html_table(gt, gr)}
<h2>Training (read from each run's DiskLogger log)</h2>{_html_table(tt, tr)}
<h2>Training curves</h2><div class="charts">{"".join(charts)}</div>
<h2>Definitions</h2><ul>{"".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in DEFINITIONS.items())}</ul>
<h2>Where every number comes from</h2><ul>{files_html}</ul><ul>{notes}</ul>
</body></html>
"""
    paths = {"md": out / "report.md", "html": out / "report.html", "json": out / "report.json"}
    paths["md"].write_text(md_text, encoding="utf-8")
    paths["html"].write_text(html_text, encoding="utf-8")
    report["definitions"] = DEFINITIONS
    paths["json"].write_text(
        json.dumps(_finite(report), indent=2, default=_json_default) + "\n", encoding="utf-8"
    )
    for p in pngs:
        paths[f"png:{p.stem}"] = p
    return paths


def _finite(o: Any) -> Any:
    """NaN/inf -> None, so report.json is strict JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
