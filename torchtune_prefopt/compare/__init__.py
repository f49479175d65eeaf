"""Matched comparison of preference losses (the ``prefopt_compare`` recipe's building blocks).

* :mod:`~torchtune_prefopt.compare.runs`: the per-loss ``prefopt_distributed`` commands
  (same base config, seed, data, steps and schedule; KTO on the unpaired twin of the data);
* :mod:`~torchtune_prefopt.compare.metrics`: held-out metrics (each loss's own implicit
  reward accuracy, loss-independent log-prob margins, drift, Monte-Carlo KL) and DiskLogger
  log parsing;
* :mod:`~torchtune_prefopt.compare.generation`: chat-template prompts, batched generation
  (left-padded, KV cache, greedy or seeded sampling), completion log-probs;
* :mod:`~torchtune_prefopt.compare.judges`: judge loading, win rates, and the example judge
  of the tiny synthetic set;
* :mod:`~torchtune_prefopt.compare.evaluation`: loading the runs' checkpoints and evaluating
  them against the reference;
* :mod:`~torchtune_prefopt.compare.report`: report.md / report.html / report.json / PNG plots.

See docs/compare.md.
"""

from torchtune_prefopt.compare.judges import (
    CourtesyJudge,
    build_judge,
    courtesy_reward,
    courtesy_score,
)
from torchtune_prefopt.compare.metrics import (
    DEFINITIONS,
    TRAIN_CURVE_METRICS,
    HeldoutLogps,
    heldout_metrics,
    kl_estimate,
    loss_rewards,
    pair_accuracy,
    parse_disk_log,
    read_run_logs,
)
from torchtune_prefopt.compare.report import write_report
from torchtune_prefopt.compare.runs import DEFAULT_LOSSES, RunSpec, kto_dataset_overrides, plan_runs

__all__ = [
    "DEFAULT_LOSSES",
    "DEFINITIONS",
    "TRAIN_CURVE_METRICS",
    "CourtesyJudge",
    "HeldoutLogps",
    "RunSpec",
    "build_judge",
    "courtesy_reward",
    "courtesy_score",
    "heldout_metrics",
    "kl_estimate",
    "kto_dataset_overrides",
    "loss_rewards",
    "pair_accuracy",
    "parse_disk_log",
    "plan_runs",
    "read_run_logs",
    "write_report",
]
