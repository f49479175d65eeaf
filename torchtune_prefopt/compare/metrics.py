"""Held-out comparison metrics and DiskLogger log parsing (pure functions, no model code).

Every metric is defined in :data:`DEFINITIONS` (the report prints them). Notation, per
held-out pair ``i`` with prompt ``x``, chosen ``y_w`` and rejected ``y_l``:
``S(y) = log π(y|x)`` summed over the completion tokens (EOS included), ``A(y) = S(y)/|y|``
the per-token mean; ``S_ref``/``A_ref`` the same under the reference model (the base weights
every run starts from). A "pair accuracy" counts 1 when the chosen side scores higher, 0.5 on
an exact tie and 0 otherwise (the training recipe's convention).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from torchtune_prefopt.losses import PAIR_METRICS, pair_accuracy, pair_metrics
from torchtune_prefopt.modules.sequence_logprobs import SequenceLogProbs

__all__ = [
    "DEFINITIONS",
    "HeldoutLogps",
    "TRAIN_CURVE_METRICS",
    "heldout_metrics",
    "iter_disk_log",
    "kl_estimate",
    "prompt_mean",
    "loss_rewards",
    "pair_accuracy",
    "parse_disk_log",
    "read_run_logs",
]

# Metric names the training recipe logs (prefopt_distributed), plotted when present.
TRAIN_CURVE_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "rewards/desirable",
    "rewards/undesirable",
    "logps/desirable",
    "logps/undesirable",
    "kl",
    "grad_norm",
    "lr",
    "eval/rewards/accuracies",
    "eval/rewards/margins",
    "eval/logps/chosen",
    "eval/logps/rejected",
)

DEFINITIONS: Dict[str, str] = {
    **PAIR_METRICS,
    "margin_improved": "loss-independent: fraction of pairs whose summed log-prob margin grew vs the reference, "
    "i.e. D = [S(y_w) - S(y_l)] - [S_ref(y_w) - S_ref(y_l)] > 0 (ties 0.5); the DPO implicit-reward "
    "accuracy of every policy, whatever its loss",
    "margin_gain": "mean of D (nats per pair)",
    "logps/accuracies_per_token": "the same with per-token mean log-probs A(y_w) vs A(y_l) "
    "(length-normalised)",
    "chosen_logp_drift": "mean of S(y_w) - S_ref(y_w) (nats per sequence); negative = the chosen answer became "
    "LESS likely than under the reference",
    "rejected_logp_drift": "mean of S(y_l) - S_ref(y_l) (nats per sequence)",
    "chosen_logp_fell": "fraction of pairs with S(y_w) < S_ref(y_w)",
    "kl": "Monte-Carlo KL(pi || pi_ref) on held-out prompts: mean over prompts and samples of "
    "log pi(y|x) - log pi_ref(y|x) summed over the sampled tokens, y ~ pi (temperature 1, no top-k, "
    "fixed seed) truncated at max_new_tokens (an unbiased estimate of the KL between the distributions "
    "of the first max_new_tokens tokens); +- one standard error over prompts",
    "gold_reward": "mean gold reward r*(x, y) of the same samples y ~ pi as the KL (temperature 1, held-out "
    "prompts): an unbiased estimate of E_pi[r*]; +- one standard error over prompts",
    "sample_length": "mean length (tokens, stop token excluded) of those samples; +- one standard error over prompts",
    "response_length": "mean number of generated tokens on held-out prompts (stop token excluded; generation "
    "settings as listed), the length-bias measure",
    "length_ratio": "response_length / the reference's response_length on the same prompts",
    "hit_max_new_tokens": "fraction of responses cut at max_new_tokens (no stop token)",
    "win_rate": "judge win rate vs the reference's response on the same prompt: pairwise judges are asked in both "
    "orders, p = (J(x, a, b) + 1 - J(x, b, a)) / 2; reward-model judges give p = 1, 0.5, 0 for "
    "score(a) >, =, < score(b); mean of p",
}


# --------------------------------------------------------------------------- logs

_STEP_RE = re.compile(r"^Step (\d+) \| (.*)$")


def iter_disk_log(path) -> Iterator[Tuple[int, Dict[str, float]]]:
    """``(step, {metric: value})`` for every line of a torchtune ``DiskLogger`` file, in order.

    Lines look like ``Step 12 | loss:0.69 rewards/accuracies:0.5 `` (``log_dict``) or
    ``Step 12 | loss:0.69`` (``log``). Values that are not numbers are skipped.
    """
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        m = _STEP_RE.match(line.strip())
        if not m:
            continue
        metrics: Dict[str, float] = {}
        for tok in m.group(2).split():
            name, sep, value = tok.rpartition(":")
            if not sep or not name:
                continue
            try:
                metrics[name] = float(value)
            except ValueError:
                continue
        yield int(m.group(1)), metrics


def parse_disk_log(path) -> Dict[str, List[Tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from a torchtune ``DiskLogger`` file
    (:func:`iter_disk_log`); a metric logged twice at one step keeps the last value."""
    out: Dict[str, Dict[int, float]] = {}
    for step, metrics in iter_disk_log(path):
        for name, v in metrics.items():
            out.setdefault(name, {})[step] = v
    return {k: sorted(v.items()) for k, v in out.items()}


def read_run_logs(log_dir) -> Tuple[Dict[str, List[Tuple[int, float]]], List[Path]]:
    """Merge every ``*.txt`` DiskLogger file in ``log_dir`` (oldest name first: a resumed run
    appends a new file; later files win on the same step). Returns ``(metrics, files)``."""
    log_dir = Path(log_dir)
    files = sorted(p for p in log_dir.glob("*.txt") if p.is_file()) if log_dir.is_dir() else []
    merged: Dict[str, Dict[int, float]] = {}
    for f in files:
        for name, series in parse_disk_log(f).items():
            merged.setdefault(name, {}).update(dict(series))
    return {k: sorted(v.items()) for k, v in merged.items()}, files


# --------------------------------------------------------------------------- held-out


@dataclass
class HeldoutLogps:
    """One model's completion log-probs on the held-out pairs: the chosen and the rejected
    completions' :class:`~torchtune_prefopt.modules.SequenceLogProbs` (float64, ``[N]``), the
    same object training scores with, so the loss takes them through the one form rule
    (:func:`~torchtune_prefopt.losses.loss_inputs`)."""

    chosen: SequenceLogProbs
    rejected: SequenceLogProbs

    #: the per-row fields (``<chosen|rejected>_<sum|mean|tokens>``) of :meth:`to_rows`
    COLUMNS = ("sum", "mean", "tokens")

    @staticmethod
    def of_columns(chosen_sum, rejected_sum, chosen_mean, rejected_mean, chosen_tokens, rejected_tokens) -> "HeldoutLogps":  # fmt: skip
        return HeldoutLogps(
            SequenceLogProbs(chosen_sum, chosen_mean, chosen_tokens),
            SequenceLogProbs(rejected_sum, rejected_mean, rejected_tokens),
        )

    chosen_sum = property(lambda self: self.chosen.sum)
    rejected_sum = property(lambda self: self.rejected.sum)
    chosen_mean = property(lambda self: self.chosen.mean)
    rejected_mean = property(lambda self: self.rejected.mean)

    @staticmethod
    def cat(parts: Sequence["HeldoutLogps"]) -> "HeldoutLogps":
        return HeldoutLogps(
            functools.reduce(SequenceLogProbs.cat, [p.chosen for p in parts]),
            functools.reduce(SequenceLogProbs.cat, [p.rejected for p in parts]),
        )

    def to_rows(self) -> List[Dict[str, float]]:
        cols = {}
        for side in ("chosen", "rejected"):
            lp = getattr(self, side)
            cols.update(
                {f"{side}_sum": lp.sum, f"{side}_mean": lp.mean, f"{side}_tokens": lp.num_tokens}
            )
        keys = [f"{side}_{c}" for c in self.COLUMNS for side in ("chosen", "rejected")]
        values = [cols[k].tolist() for k in keys]
        return [dict(zip(keys, vals)) for vals in zip(*values)]


def _pairs(lp: Optional[HeldoutLogps]):
    return None if lp is None else (lp.chosen, lp.rejected)


def loss_rewards(
    loss_fn, pol: HeldoutLogps, ref: Optional[HeldoutLogps]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The loss's own implicit rewards ``(r(y_w), r(y_l))`` (float64), as the held-out
    evaluator computes them (:func:`torchtune_prefopt.losses.pair_metrics`)."""
    per_pair = pair_metrics(loss_fn, _pairs(pol), _pairs(ref))
    return per_pair["rewards/chosen"], per_pair["rewards/rejected"]


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean().item()) if x.numel() else float("nan")


def heldout_metrics(loss_fn, pol: HeldoutLogps, ref: Optional[HeldoutLogps]) -> Dict[str, float]:
    """All held-out log-prob metrics of one policy (see :data:`DEFINITIONS`): the means of the
    held-out evaluator's per-pair metrics (:func:`torchtune_prefopt.losses.pair_metrics`, the
    names training logs as ``eval/<name>``) and the comparison's own drift measures.

    ``loss_fn=None`` (the reference row) gives only the loss-independent log-prob metrics.
    """
    out: Dict[str, float] = {"rows": float(pol.chosen_sum.numel())}
    for name, values in pair_metrics(loss_fn, _pairs(pol), _pairs(ref)).items():
        out[name] = _mean(values)
    out["logps/accuracies_per_token"] = _mean(pair_accuracy(pol.chosen_mean, pol.rejected_mean))
    if ref is not None and loss_fn is not None:
        d = (pol.chosen_sum - pol.rejected_sum) - (ref.chosen_sum - ref.rejected_sum)
        out["margin_improved"] = _mean(pair_accuracy(d, torch.zeros_like(d)))
        out["margin_gain"] = _mean(d)
        out["chosen_logp_drift"] = _mean(pol.chosen_sum - ref.chosen_sum)
        out["rejected_logp_drift"] = _mean(pol.rejected_sum - ref.rejected_sum)
        out["chosen_logp_drift_per_token"] = _mean(pol.chosen_mean - ref.chosen_mean)
        out["rejected_logp_drift_per_token"] = _mean(pol.rejected_mean - ref.rejected_mean)
        out["chosen_logp_fell"] = _mean((pol.chosen_sum < ref.chosen_sum).double())
        out["rejected_logp_fell"] = _mean((pol.rejected_sum < ref.rejected_sum).double())
    return out


def prompt_mean(values: torch.Tensor, prompt_index: torch.Tensor) -> Tuple[float, float, int]:
    """``(mean, standard error, prompts)`` of per-sample ``values``: the mean over all samples,
    and the standard error over prompts (each prompt's sample mean is one draw; samples of
    one prompt are not independent draws of the prompt distribution)."""
    values = values.double()
    prompts = torch.unique(prompt_index)
    per_prompt = torch.stack([values[prompt_index == p].mean() for p in prompts])
    n = per_prompt.numel()
    se = float(per_prompt.std(unbiased=True).item() / math.sqrt(n)) if n > 1 else float("nan")
    return float(values.mean().item()), se, n


def kl_estimate(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, prompt_index: torch.Tensor
) -> Dict[str, float]:
    """Monte-Carlo KL from samples ``y ~ π``: mean of ``log π(y) - log π_ref(y)``, with the
    standard error over prompts (:func:`prompt_mean`)."""
    diff = (policy_logps - reference_logps).double()
    kl, se, n = prompt_mean(diff, prompt_index)
    return {
        "kl": kl,
        "kl_stderr": se,
        "kl_prompts": float(n),
        "kl_samples": float(diff.numel()),
        "kl_negative_fraction": float((diff < 0).double().mean().item()),
    }
