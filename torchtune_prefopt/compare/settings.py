"""The one owner of ``prefopt_compare``'s config keys: a table of the same kind as
``prefopt_distributed``'s (:mod:`torchtune_prefopt.training.recipe_config`), from which its
validation (:func:`validate_compare_config`), its defaults (:func:`read_compare_settings`), the
evaluation's settings (:func:`eval_settings`) and the key table of docs/compare.md
(:func:`compare_key_table_markdown`, a test keeps the copy equal) are derived.

Keys whose value is a component (``judge``, ``task``, ``gold_reward``, ``heldout.dataset``,
``kto_dataset``) or a free mapping (``train_overrides``, ``loss_configs``, ``loss_overrides``,
``sweep``) are rows; their own sub-keys belong to what they configure.
"""

from __future__ import annotations

import os
from typing import Any

from torchtune_prefopt.compare.evaluation import EvalSettings
from torchtune_prefopt.compare.runs import DEFAULT_LOSSES
from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.training.recipe_config import (
    REQUIRED,
    ConfigKey,
    RecipeSettings,
    check_known_keys,
    check_values,
    choice,
    flag,
    optional_positive_int,
    positive_int,
    read_settings,
    read_table,
    table_markdown,
)

__all__ = [
    "COMPARE_KEYS",
    "compare_key_table_markdown",
    "default_eval_settings",
    "eval_settings",
    "read_compare_settings",
    "validate_compare_config",
]


def _mapping(key: str, v: Any) -> None:
    from omegaconf import DictConfig

    if v is not None and not isinstance(v, (DictConfig, dict)):
        raise PrefOptUserError(f"{key} must be a mapping (key: value), got {v!r}")


def _string(key: str, v: Any) -> None:
    if not isinstance(v, str) or not v:
        raise PrefOptUserError(f"config key '{key}' is required (a prefopt_distributed config)")


def _optional_string(key: str, v: Any) -> None:
    if v is not None and (not isinstance(v, str) or not v):
        raise PrefOptUserError(f"{key} must be a folder path, got {v!r}")


def _non_negative_int(key: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise PrefOptUserError(f"{key} must be an integer >= 0, got {v!r}")


def _temperature(key: str, v: Any) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
        raise PrefOptUserError(f"{key} must be a number >= 0 (0: greedy), got {v!r}")


_K = ConfigKey
#: every key of a ``prefopt_compare`` config
COMPARE_KEYS = (
    _K("output_dir", REQUIRED, "where the runs (one folder each), the evaluation and the report go"),
    _K("model_dir", None, "an HF model folder: every run's and the evaluation's model_dir (the base config's own key; a task reads it as ${model_dir})", _optional_string),
    _K("compare.base_config", REQUIRED, "the prefopt_distributed config every run starts from (name or path)", _string),
    _K("compare.train_overrides", None, "key: value applied to every run (nested keys allowed; null disables an optional component)", _mapping),
    _K("compare.losses", None, f"run names (null: {', '.join(DEFAULT_LOSSES)}); a registered loss name without loss_configs runs with its defaults"),
    _K("compare.loss_configs", None, "each run's loss config (_component_ + hyper-parameters)", _mapping),
    _K("compare.loss_overrides", None, "extra key: value overrides of one run (a departure from a matched comparison)", _mapping),
    _K("compare.sweep", None, "strengths per loss family (the frontier): run <family>_<strength> each"),
    _K("compare.seeds", None, "seeds per sweep point (error bars over seeds)"),
    _K("compare.kto_dataset", None, "KTO's unpaired rows (null: the unpaired twin of the base dataset)"),
    _K("compare.kto_rows_per_pair", 2, "KTO rows per pair of the base batch (the same completions per step)", positive_int),
    _K("compare.nproc_per_node", 1, "processes (GPUs) per training run", positive_int),
    _K("compare.max_parallel", 1, "runs trained at the same time; on GPUs each gets its own nproc_per_node GPUs", positive_int),
    _K("compare.skip_training", False, "only evaluate the runs already in output_dir/<run>", flag),
    _K("compare.skip_existing", False, "train only the runs without a final checkpoint", flag),
    _K("compare.resume", False, "as skip_existing, and continue interrupted runs from their newest checkpoint", flag),
    _K("compare.dry_run", False, "only write output_dir/commands.sh", flag),
    _K("compare.device", None, "evaluation device (null: the base config's)"),
    _K("compare.title", None, "the report's title"),
    _K("compare.task", None, "a controlled task (its SFT start, sampled pairs and gold reward)"),
    _K("compare.gold_reward", None, "a gold reward of sampled answers (the frontier's y axis)"),
    _K("compare.judge", None, "a judge or reward model for win rates against the reference"),
    _K("compare.judge_kind", "auto", "pairwise, reward or auto (from the judge's signature)", choice("auto", "pairwise", "reward")),
    _K("compare.heldout.dataset", None, "held-out pairs (null: the base config's eval_dataset)"),
    _K("compare.heldout.max_rows", 64, "the first N held-out pairs (null: all)", optional_positive_int, nullable=True),
    _K("compare.heldout.batch_size", 8, "held-out pairs scored at once", positive_int),
    _K("compare.heldout.logprobs_chunk_size", None, "tokens projected at once (null: the base config's)", optional_positive_int),
    _K("compare.generation.max_new_tokens", 32, "tokens generated per held-out prompt", positive_int),
    _K("compare.generation.temperature", 0.0, "0: greedy; > 0: sampled with generation.seed", _temperature),
    _K("compare.generation.top_k", None, "sample from the k most likely tokens (null: all)", optional_positive_int),
    _K("compare.generation.seed", 1234, "the sampling seed", _non_negative_int),
    _K("compare.generation.batch_size", 16, "prompts generated at once", positive_int),
    _K("compare.generation.kv_cache", True, "generate with the KV cache", flag),
    _K("compare.kl.samples_per_prompt", 4, "Monte-Carlo samples y ~ policy per held-out prompt (0: no KL)", _non_negative_int),
    _K("compare.kl.max_new_tokens", None, "tokens per KL sample (null: generation.max_new_tokens)", optional_positive_int),
    _K("compare.kl.seed", 4321, "the KL samples' seed", _non_negative_int),
)  # fmt: skip


def validate_compare_config(cfg: Any) -> RecipeSettings:
    """Every key against the table (unknown keys at every level, each value's check): one
    ``error:`` line naming the key. Returns :func:`read_compare_settings`."""
    if not cfg.get("output_dir"):
        raise PrefOptUserError("config key 'output_dir' is required")
    check_known_keys(cfg, COMPARE_KEYS)
    check_values(cfg, COMPARE_KEYS)
    if "WORLD_SIZE" in os.environ and os.environ.get("WORLD_SIZE") != "1":
        raise PrefOptUserError(
            "prefopt_compare runs as one process; give the training runs several with compare.nproc_per_node"
        )
    return read_compare_settings(cfg)


def read_compare_settings(cfg: Any) -> RecipeSettings:
    """Every compare key with its default, named without ``compare.``
    (``heldout_max_rows``)."""
    s = read_table(cfg, COMPARE_KEYS, strip="compare.")
    s["losses"] = list(s.losses or DEFAULT_LOSSES)
    return s


def eval_settings(s: RecipeSettings, base_cfg: Any) -> EvalSettings:
    """The evaluation's settings: the compare keys, and what they leave to the base config
    (its ``logprobs_chunk_size``) read through the recipe's own table."""
    return EvalSettings(
        max_rows=s.heldout_max_rows,
        batch_size=s.heldout_batch_size,
        chunk_size=s.heldout_logprobs_chunk_size or read_settings(base_cfg).logprobs_chunk_size,
        max_new_tokens=s.generation_max_new_tokens,
        temperature=float(s.generation_temperature or 0.0),
        top_k=s.generation_top_k,
        generation_seed=s.generation_seed,
        generation_batch_size=s.generation_batch_size,
        kv_cache=s.generation_kv_cache,
        kl_samples_per_prompt=s.kl_samples_per_prompt,
        kl_max_new_tokens=s.kl_max_new_tokens or s.generation_max_new_tokens,
        kl_seed=s.kl_seed,
    )


def default_eval_settings() -> EvalSettings:
    """The evaluation's settings with every default of the table (a base config without
    ``logprobs_chunk_size``)."""
    from omegaconf import OmegaConf

    return eval_settings(read_compare_settings(OmegaConf.create({})), OmegaConf.create({}))


def compare_key_table_markdown() -> str:
    """The key table of docs/compare.md."""
    return table_markdown(COMPARE_KEYS, identity=False)


if __name__ == "__main__":
    print(compare_key_table_markdown())
