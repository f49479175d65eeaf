"""The gold-reward frontier: expected gold reward against KL(pi || pi_ref), a point per
(loss, strength) (the DPO paper's controlled experiment, Rafailov et al. 2023, Fig. 2).

Pure functions over the comparison report (no model code): :func:`frontier_points` reads
each model's sampled evaluation (``result["kl"]``: KL, gold reward and sample length, each
with a standard error over prompts), :func:`aggregate_seeds` pools the runs of one (loss,
strength) trained with several seeds (``compare.seeds``), :func:`frontier_reading` turns the points into the
statements a user needs, :func:`plot_frontier` draws them (matplotlib, optional).

Reading rules (all numbers are from the points; "beyond error bars" means the difference
exceeds ``2 * sqrt(se_a^2 + se_b^2)``, about a 95% two-sided z-test):

* **budgets**: for KL budgets ``k`` (the 25th, 50th and 100th percentile of the trained
  points' KLs), the point with the most gold reward among those with ``KL <= k``, and
  whether it beats the best point of every other loss under that budget beyond error bars;
* **monotone**: along each loss's sweep (strongest regularisation first), whether KL and
  gold reward both rise at every step, and else where the reward peaks (a loss whose reward
  falls at high KL over-optimises: a finding, not a failure);
  A sweep whose neighbouring points differ beyond error bars neither in gold reward nor in
  KL resolves no shape, and the reading says that instead;
* **above the reference**: which points beat the reference's gold reward beyond error bars;
* **length**: which loss's samples drift longest relative to the reference (SFT) model;
* **separated**: the pairs of losses whose best points differ beyond error bars, and how
  many pairs of points of different losses do;
* **one seed**: without ``compare.seeds`` the error bars hold sampling noise only, and the
  reading says so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = [
    "aggregate_seeds",
    "frontier_points",
    "frontier_reading",
    "frontier_table",
    "plot_frontier",
    "sweep_line",
]

REFERENCE = "reference"


def _point(
    name: str, family: str, strength, result: Dict[str, Any], files, seed=None
) -> Optional[Dict]:
    kl = result.get("kl") or {}
    if "gold_reward" not in kl:
        return None
    arg, value = strength if strength else (None, None)
    return {
        "name": name,
        "seed": seed,
        "loss": family,
        "argument": arg,
        "strength": value,
        "kl": kl["kl"],
        "kl_stderr": kl["kl_stderr"],
        "gold": kl["gold_reward"],
        "gold_stderr": kl["gold_reward_stderr"],
        "length": kl.get("sample_length"),
        "length_stderr": kl.get("sample_length_stderr"),
        "samples": kl.get("kl_samples"),
        "files": dict(files or {}),
    }


def frontier_points(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The reference (KL 0) and every run that has a gold-reward evaluation."""
    points = []
    ref = report["reference"]
    p = _point(REFERENCE, REFERENCE, None, ref["result"], ref.get("files"))
    if p is not None:
        points.append(p)
    for run in report["runs"]:
        p = _point(
            run["name"],
            run.get("family") or run["name"],
            run.get("strength"),
            run["result"],
            run.get("files"),
            run.get("seed"),
        )
        if p is not None:
            points.append(p)
    return points


def _seed_mean(values: Sequence[float], stderrs: Sequence[float]) -> tuple:
    """Mean over seeds and its standard error: the spread of the per-seed estimates
    (``sd / sqrt(S)``, which holds the training-seed variance and each estimate's own
    sampling noise), never below the pooled sampling error ``sqrt(sum se_s^2) / S``."""
    n = len(values)
    mean = sum(values) / n
    pooled = math.sqrt(sum(se * se for se in stderrs)) / n
    if n < 2:
        return mean, pooled
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, max(math.sqrt(var / n), pooled)


def aggregate_seeds(points: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One point per (loss, strength) from runs trained with several seeds (``compare.seeds``):
    KL, gold reward and length averaged over the seeds, with :func:`_seed_mean`'s standard
    error; ``seeds`` and ``runs`` list what was pooled. Points without a seed pass through;
    the order of first appearance is kept."""
    groups: Dict[Any, List[Dict[str, Any]]] = {}
    for p in points:
        key = p["name"] if p.get("seed") is None else (p["loss"], p["argument"], p["strength"])
        groups.setdefault(key, []).append(p)
    return [
        members[0] if members[0].get("seed") is None else _pool_seeds(members)
        for members in groups.values()
    ]


def _pool_seeds(members: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    first = members[0]
    agg = {
        "name": first["name"].rsplit("-seed", 1)[0],
        "seed": None,
        "loss": first["loss"],
        "argument": first["argument"],
        "strength": first["strength"],
        "seeds": [m["seed"] for m in members],
        "runs": [m["name"] for m in members],
        "samples": sum(m["samples"] or 0 for m in members),
        "files": {m["name"]: m["files"].get("kl_samples") for m in members},
    }
    for key in ("kl", "gold", "length"):
        if any(m[key] is None for m in members):
            agg[key] = agg[f"{key}_stderr"] = None
            continue
        agg[key], agg[f"{key}_stderr"] = _seed_mean(
            [m[key] for m in members], [m[f"{key}_stderr"] or 0.0 for m in members]
        )
    return agg


def sweep_line(points: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One loss's points in sweep order: strongest regularisation first (largest beta / tau:
    the least KL for DPO, IPO, KTO and SimPO), points without a strength by KL."""
    return sorted(
        points,
        key=lambda p: (p["strength"] is None, -(p["strength"] or 0.0), p["kl"]),
    )


def _apart(a: Dict, b: Dict, key: str = "gold") -> bool:
    se = math.sqrt(a[f"{key}_stderr"] ** 2 + b[f"{key}_stderr"] ** 2)
    return abs(a[key] - b[key]) > 2.0 * se


def _label(p: Dict) -> str:
    if p["argument"] is None:
        return p["name"]
    return f"{p['loss']} {p['argument']}={p['strength']:g}"


def _pct(values: Sequence[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]


def frontier_reading(points: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Budgets, monotonicity, length drift and separation (module docstring) as data plus
    ``lines``: the sentences the report prints."""
    trained = [p for p in points if p["loss"] != REFERENCE]
    ref = next((p for p in points if p["loss"] == REFERENCE), None)
    losses = list(dict.fromkeys(p["loss"] for p in trained))
    out: Dict[str, Any] = {"budgets": [], "monotone": {}, "separated": [], "lines": []}
    if not trained:
        return out
    lines = out["lines"]
    if not any(p.get("seeds") for p in trained):
        lines.append(
            "One training seed per point: the error bars hold sampling noise only, not "
            "seed-to-seed training variance; set compare.seeds (e.g. [0, 1, 2]) before "
            "concluding that two points differ."
        )
    kls = [p["kl"] for p in trained]
    for q in (0.25, 0.5, 1.0):
        k = _pct(kls, q)
        if any(b["kl_budget"] == k for b in out["budgets"]):
            continue
        best_per_loss = {}
        for loss in losses:
            under = [p for p in trained if p["loss"] == loss and p["kl"] <= k]
            if under:
                best_per_loss[loss] = max(under, key=lambda p: p["gold"])
        if not best_per_loss:
            continue
        best = max(best_per_loss.values(), key=lambda p: p["gold"])
        beaten = [
            loss for loss, p in best_per_loss.items() if loss != best["loss"] and _apart(best, p)
        ]
        others = [loss for loss in best_per_loss if loss != best["loss"]]
        out["budgets"].append(
            {
                "kl_budget": k,
                "best": best["name"],
                "best_loss": best["loss"],
                "gold": best["gold"],
                "gold_stderr": best["gold_stderr"],
                "beyond_error_bars_over": beaten,
                "within_error_bars_of": [x for x in others if x not in beaten],
                "losses_without_a_point": [x for x in losses if x not in best_per_loss],
            }
        )
        tail = f"; ahead beyond error bars of {', '.join(beaten)}" if beaten else ""
        ties = [x for x in others if x not in beaten]
        if ties:
            tail += f"; within error bars of {', '.join(ties)}"
        none = [x for x in losses if x not in best_per_loss]
        if none:
            tail += f" ({', '.join(none)}: no point at this KL)"
        lines.append(
            f"At KL <= {k:.3g} nats, **{best['loss']}** reaches the most gold reward: "
            f"{best['gold']:.3f} +- {best['gold_stderr']:.3f} ({_label(best)}){tail}."
        )
    for loss in losses:
        line = sweep_line([p for p in trained if p["loss"] == loss])
        if len(line) < 2:
            continue
        kl_up = all(b["kl"] > a["kl"] for a, b in zip(line, line[1:]))
        gold_up = all(b["gold"] > a["gold"] for a, b in zip(line, line[1:]))
        out["monotone"][loss] = kl_up and gold_up
        order = " -> ".join(f"{_label(p)} (KL {p['kl']:.3g}, r* {p['gold']:.3f})" for p in line)
        if kl_up and gold_up:
            lines.append(f"{loss}: gold reward rises with KL over its whole sweep: {order}.")
            continue
        peak = max(line, key=lambda p: p["gold"])
        why = [] if kl_up else ["KL is not monotone along the sweep"]
        if gold_up:
            why.append("reward rises at every step")
        else:
            why.append(
                f"reward peaks at {_label(peak)} (KL {peak['kl']:.3g}, r* {peak['gold']:.3f})"
            )
        arg = peak["argument"]
        if arg is not None and peak is line[0]:
            why.append(f"the peak is the sweep's strongest end: try a larger {arg}")
        elif arg is not None and peak is line[-1]:
            why.append(f"the peak is the sweep's weakest end: try a smaller {arg}")
        out.setdefault("peaks", {})[loss] = peak["name"]
        pairs = list(zip(line, line[1:]))
        if not any(_apart(a, b) or _apart(a, b, "kl") for a, b in pairs):
            # the order of points that do not differ is noise: no finding to report
            out.setdefault("unresolved", []).append(loss)
            lines.append(
                f"{loss}: its points do not differ beyond error bars, neighbour to neighbour, "
                f"in gold reward or KL: this sweep does not resolve a shape ({order})."
            )
            continue
        lines.append(
            f"{loss}: gold reward does NOT rise with KL over its whole sweep (a finding: "
            f"{'; '.join(why)}): {order}."
        )
    if ref is not None and ref.get("gold_stderr") is not None:
        above = [p for p in trained if p["gold"] > ref["gold"] and _apart(p, ref)]
        out["above_reference"] = [p["name"] for p in above]
        rest = [p for p in trained if p not in above]
        lines.append(
            f"Above the reference's gold reward ({ref['gold']:.3f} +- {ref['gold_stderr']:.3f}) "
            f"beyond error bars: {len(above)} of {len(trained)} points"
            + (f" ({', '.join(_label(p) for p in above)})" if above else "")
            + (f"; not: {', '.join(_label(p) for p in rest)}" if rest else "")
            + "."
        )
    with_len = [p for p in trained if p.get("length") is not None]
    if with_len and ref is not None and ref.get("length") is not None:
        longest = max(with_len, key=lambda p: p["length"])
        shortest = min(with_len, key=lambda p: p["length"])
        out["length"] = {
            "reference": ref["length"],
            "longest": longest["name"],
            "longest_length": longest["length"],
            "shortest": shortest["name"],
            "shortest_length": shortest["length"],
        }
        lines.append(
            f"Length: **{longest['loss']}** drifts longest ({_label(longest)}: "
            f"{longest['length']:.2f} +- {longest['length_stderr']:.2f} tokens vs the reference's "
            f"{ref['length']:.2f}); shortest: {_label(shortest)} ({shortest['length']:.2f})."
        )
    best_of = {
        loss: max((p for p in trained if p["loss"] == loss), key=lambda p: p["gold"])
        for loss in losses
    }
    for i, a in enumerate(losses):
        for b in losses[i + 1 :]:
            if _apart(best_of[a], best_of[b]):
                out["separated"].append([a, b])
    cross = [
        (a, b) for i, a in enumerate(trained) for b in trained[i + 1 :] if a["loss"] != b["loss"]
    ]
    apart = sum(_apart(a, b) for a, b in cross)
    out["point_pairs"] = {"separated": apart, "total": len(cross)}
    if cross:
        lines.append(
            f"Points of different losses that differ in gold reward beyond error bars: {apart} of "
            f"{len(cross)} pairs."
        )
    n_pairs = len(losses) * (len(losses) - 1) // 2
    if n_pairs:
        sep = ", ".join(f"{a}/{b}" for a, b in out["separated"]) or "none"
        lines.append(
            f"Best points separated beyond error bars: {len(out['separated'])} of {n_pairs} loss pairs ({sep})."
        )
    return out


def frontier_table(points: Sequence[Dict[str, Any]]):
    """``(header, rows)`` of the frontier table (strings)."""
    head = [
        "point",
        "loss",
        "strength",
        "KL (nats)",
        "gold reward r*",
        "sample length",
        "samples",
        "seeds",
    ]
    rows = []
    for p in points:
        strength = "—" if p["argument"] is None else f"{p['argument']}={p['strength']:g}"
        rows.append(
            [
                p["name"],
                p["loss"],
                strength,
                f"{p['kl']:.4f} ± {p['kl_stderr']:.4f}",
                f"{p['gold']:.3f} ± {p['gold_stderr']:.3f}",
                "—" if p["length"] is None else f"{p['length']:.2f} ± {p['length_stderr']:.2f}",
                f"{p['samples']:.0f}" if p.get("samples") is not None else "—",
                ", ".join(str(x) for x in p["seeds"]) if p.get("seeds") else "—",
            ]
        )
    return head, rows


def plot_frontier(points: Sequence[Dict[str, Any]], path) -> Optional[Path]:
    """Gold reward vs KL with error bars, a line per loss along its sweep
    (:func:`sweep_line`), the reference point at KL 0; ``None`` without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ref = next((p for p in points if p["loss"] == REFERENCE), None)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for loss in dict.fromkeys(p["loss"] for p in points if p["loss"] != REFERENCE):
        line = sweep_line([p for p in points if p["loss"] == loss])
        ax.errorbar(
            [p["kl"] for p in line],
            [p["gold"] for p in line],
            xerr=[p["kl_stderr"] for p in line],
            yerr=[p["gold_stderr"] for p in line],
            marker="o",
            capsize=3,
            label=loss,
        )
        for p in line:
            if p["strength"] is not None:
                ax.annotate(
                    f"{p['strength']:g}",
                    (p["kl"], p["gold"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    if ref is not None:
        ax.errorbar(
            [ref["kl"]],
            [ref["gold"]],
            yerr=[ref["gold_stderr"]],
            marker="s",
            color="black",
            capsize=3,
            label="reference (SFT)",
        )
    ax.set_xlabel("KL(π || π_ref), nats per sequence (Monte-Carlo, ± s.e.)")
    ax.set_ylabel("gold reward E[r*] (± s.e.)")
    ax.set_title("Gold-reward frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
