"""Charts of the comparison report: training curves as PNG (matplotlib, Agg backend, when
installed) and as inline SVG (no dependency), so the HTML report is complete either way."""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Dict, List, Tuple

from torchtune_prefopt.compare.metrics import TRAIN_CURVE_METRICS

__all__ = ["curve_metrics", "matplotlib_available", "metric_slug", "plot_curves", "svg_chart"]

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def metric_slug(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", metric).strip("_")


def curve_metrics(curves: Dict[str, Dict[str, List[Tuple[int, float]]]]) -> List[str]:
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
    for metric in curve_metrics(curves):
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
        path = plot_dir / f"{metric_slug(metric)}.png"
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
