"""Write the comparison report: ``report.md``, ``report.html``, ``report.json`` and plots.

The input is one JSON-able dict (see :func:`write_report`); every number in the tables comes
from it, and it names the file each number was read from or written to (the runs' DiskLogger
logs for training numbers; the comparison's own DiskLogger-format ``eval/<run>/metrics.txt``
and per-row JSONL files for held-out and generation numbers).

Charts are in :mod:`~torchtune_prefopt.compare.charts`, tables in
:mod:`~torchtune_prefopt.compare.tables`; this module assembles the report dict and writes
the files. ``report.json`` holds everything, including the raw curves.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from torchtune_prefopt.compare.charts import (
    curve_metrics,
    matplotlib_available,
    metric_slug,
    plot_curves,
    svg_chart,
)
from torchtune_prefopt.compare.frontier import (
    aggregate_seeds,
    frontier_points,
    frontier_reading,
    frontier_table,
    plot_frontier,
)
from torchtune_prefopt.compare.metrics import DEFINITIONS
from torchtune_prefopt.compare.runs import loss_label, matched_differences
from torchtune_prefopt.compare.tables import (
    generation_table,
    heldout_table,
    html_table,
    md_table,
    rows_for,
    setup_lines,
    training_table,
)
from torchtune_prefopt.losses import loss_traits

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
        per_step = rows * (2 if loss_traits(loss_fn).paired else 1)
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
    report = {
        "title": title,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "output_dir": str(output_dir),
        "settings": {
            "base_config": settings.pop("base_config"),
            "base_config_file": settings.pop("base_config_file"),
            "overrides": settings.pop("overrides"),
            "base_checkpoint": settings.pop("base_checkpoint"),
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
            md_table(fh, fr),
            "",
        ]
        frontier_html = (
            "<h2>Gold-reward frontier (reward vs KL)</h2>"
            + (f'<img src="plots/{png.name}" alt="frontier">' if png else "")
            + "<ul>"
            + "".join(f"<li>{html.escape(line).replace('**', '')}</li>" for line in reading)
            + "</ul>"
            + html_table(fh, fr)
        )

    ht, hr = heldout_table(report)
    gt, gr = generation_table(report)
    tt, tr = training_table(report)
    title = report.get("title", "Preference-loss comparison")

    md = [f"# {title}", "", *setup_lines(report), ""]
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
        md_table(ht, hr),
        "",
        "## Generation, length and KL",
        "",
        md_table(gt, gr),
        "",
        "## Training (read from each run's DiskLogger log)",
        "",
        md_table(tt, tr),
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
    for r in rows_for(report):
        files = r.get("files", {})
        md.append(f"- **{r['name']}**: " + "; ".join(f"{k}: `{v}`" for k, v in files.items()))
        if r.get("command"):
            md.append(f"  - trained by: `{r['command']}`")
    for note in report.get("notes", []):
        md.append(f"- note: {note}")
    md_text = "\n".join(md) + "\n"

    charts = []
    for metric in curve_metrics(curves):
        png = out / "plots" / f"{metric_slug(metric)}.png"
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
        for r in rows_for(report)
    )
    setup_html = "".join(
        f"<li>{html.escape(line[2:]).replace('`', '')}</li>" for line in setup_lines(report)
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
<h2>Held-out preference metrics (log-probs)</h2>{html_table(ht, hr)}
<h2>Generation, length and KL</h2>{html_table(gt, gr)}
<h2>Training (read from each run's DiskLogger log)</h2>{html_table(tt, tr)}
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
