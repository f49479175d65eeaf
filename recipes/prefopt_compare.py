# torchtune-prefopt: matched comparison of preference losses.
#
#   tune run prefopt_compare --config tiny/compare                        # train + evaluate + report
#   tune run prefopt_compare --config tiny/compare compare.losses=[dpo,simpo]
#   tune run prefopt_compare --config tiny/compare compare.dry_run=true   # only write commands.sh
#   tune run prefopt_compare --config tiny/compare compare.skip_training=true   # evaluate existing runs
"""Train several preference losses under identical conditions and compare them in one report.

1. **Train** (unless ``compare.skip_training``): for every name in ``compare.losses`` run the
   ordinary ``prefopt_distributed`` recipe as a subprocess,
   ``tune run [--nproc_per_node N] prefopt_distributed --config <compare.base_config>
   output_dir=<output_dir>/<name> loss._component_=... loss.<arg>=... <compare.train_overrides>``.
   Base weights, data, seed, steps, batch and schedule come from the one base config, so
   the runs are matched; KTO trains on the unpaired twin of the same data (chosen ->
   desirable, rejected -> undesirable) with ``compare.kto_rows_per_pair`` x the batch (the
   same completions per step). The exact commands are written to ``<output_dir>/commands.sh``
   first: on a cluster, launch them as independent jobs (in parallel, any number of GPUs
   each) and then run this recipe with ``compare.skip_training=true``.
2. **Evaluate** every run's final checkpoint and the reference (the base weights) on the
   same held-out pairs, in this process, on one device: each loss's own implicit-reward
   accuracy (computed by the loss object), loss-independent log-prob margins and drift,
   Monte-Carlo KL to the reference, greedy (or seeded) generations with the tokenizer's
   chat template -> response length vs the reference, and an optional judge's win rate.
3. **Report**: ``report.md``, ``report.html``, ``report.json``, ``plots/*.png`` (training
   curves from each run's DiskLogger log), ``eval/<run>/`` (the numbers as a DiskLogger file
   plus per-row JSONL). See docs/compare.md.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils

from torchtune_prefopt import _config
from torchtune_prefopt._config import parse
from torchtune_prefopt.compare import evaluation as ev
from torchtune_prefopt.compare.gold import build_gold_reward
from torchtune_prefopt.compare.judges import build_judge
from torchtune_prefopt.compare.metrics import read_run_logs
from torchtune_prefopt.compare.report import (
    assemble_report,
    run_record,
    training_summary,
    write_eval_files,
    write_report,
)
from torchtune_prefopt.compare.runs import (
    dotlist,
    expand_sweep,
    plan_runs,
    replace_component,
    runs_to_train,
    train_runs,
)
from torchtune_prefopt.compare.settings import eval_settings, validate_compare_config
from torchtune_prefopt.errors import PrefOptUserError, report_user_errors
from torchtune_prefopt.losses import build_loss
from torchtune_prefopt.models.hf_checkpoint import HFCheckpoint
from torchtune_prefopt.training import checkpoints as ckpt
from torchtune_prefopt.training.recipe_config import configured, read_settings
from torchtune_prefopt.training.recipe_config import validate_config as validate_recipe_config

log = utils.get_logger("INFO")


def _final_checkpoint(run_dir: Path) -> Optional[Path]:
    link = run_dir / "final"
    if link.exists():
        return link.resolve()
    return ckpt.latest_checkpoint(run_dir)


class CompareRecipe:
    def __init__(self, cfg: DictConfig):
        self.s = validate_compare_config(cfg)  # every compare.* key with its default
        self.cfg = cfg
        self.out = Path(str(cfg.output_dir)).expanduser().absolute()
        raw = str(self.s.base_config)
        self.base_path = _config.resolve_config(raw)
        # Commands name the config as the user did (a name works on any machine with the
        # package installed); a file path is made absolute.
        self.base_ref = str(self.base_path) if Path(raw).expanduser().is_file() else raw
        self.train_overrides = dotlist_all(self.s.train_overrides)
        if self.s.model_dir is not None:
            self.train_overrides.insert(0, f"model_dir={self._model_dir(self.s.model_dir)}")
        self.task = None
        if self.s.task is not None:
            try:
                self.task = config.instantiate(self.s.task)
            except (ValueError, TypeError) as e:
                raise PrefOptUserError(f"compare.task: {e}") from e
        try:
            self.gold_reward = build_gold_reward(self.s.gold_reward)
        except ValueError as e:
            raise PrefOptUserError(str(e)) from e
        if self.gold_reward is None and self.task is not None:
            self.gold_reward = self.task.gold_reward
        # the sweep is checked here, before the task's SFT or any training
        self.losses = self.s.losses
        self.sweep = expand_sweep(
            self.losses, self.s.loss_configs or {}, self.s.sweep, self.s.seeds
        )
        self._load_base()
        self._heldout_config(before_task=True)  # refused before any compute

    def _heldout_config(self, before_task: bool = False) -> Any:
        """The held-out pairs' dataset config: ``compare.heldout.dataset``, else the base
        config's ``eval_dataset`` (the task's held-out pairs once it is prepared; ``before_task``:
        a task will provide them unless ``compare.train_overrides`` nulls eval_dataset). None
        at all: one error line."""
        if configured(self.s.heldout_dataset):
            return self.s.heldout_dataset
        user = self.s.train_overrides or {}
        nulled = "eval_dataset" in user and user["eval_dataset"] is None
        node = read_settings(self.base_cfg).eval_dataset
        if nulled or (node is None and not (before_task and self.task is not None)):
            raise PrefOptUserError(
                "compare.heldout.dataset: none given and the base config has no eval_dataset"
                + (" (compare.train_overrides.eval_dataset is null)" if nulled else "")
            )
        return node

    def _model_dir(self, model_dir: str) -> Path:
        """``model_dir``: an HF folder the base config reads through its own ``model_dir`` key
        (a base without one would train another model: refused)."""
        from torchtune_prefopt.models.hf.spec import read_config_json

        folder, _ = read_config_json(model_dir)
        base = OmegaConf.load(self.base_path)
        if "model_dir" not in base:
            raise PrefOptUserError(
                f"model_dir: the base config {self.s.base_config} has no model_dir key, so its "
                "runs would not train this folder; use an hf/* or smollm2/* base config"
            )
        return folder.absolute()

    def _load_base(self) -> None:
        self.base_cfg = _config.load_config(
            ["--config", str(self.base_path), *self.train_overrides, f"output_dir={self.out}"]
        )

    # ------------------------------------------------------------------ task
    def prepare_task(self) -> None:
        """``compare.task``: build the controlled task's SFT base and labelled pairs (once, in
        ``<output_dir>/task``) and point every run at them."""
        if self.task is None:
            return
        t0 = time.perf_counter()
        prepared = self.task.prepare(self.out / "task")
        self.task_manifest = prepared["manifest"]
        task_overrides = []
        for key, node in prepared["overrides"].items():
            task_overrides += replace_component(key, self.base_cfg.get(key), node)
        # the user's train_overrides still win
        self.train_overrides = task_overrides + self.train_overrides
        self._load_base()
        log.info(f"[compare] task ready in {time.perf_counter() - t0:.0f}s: {self.out / 'task'}")

    # ------------------------------------------------------------------ plan
    def plan(self, local: Optional[bool] = None):
        """The runs, every run's config validated (``local``: also against this machine's
        files and devices; default: unless ``compare.dry_run``)."""
        s = self.s
        losses = self.losses
        loss_overrides = {k: dotlist_all(v) for k, v in (s.loss_overrides or {}).items()}
        unknown = sorted(set(loss_overrides) - set(losses))
        if unknown:
            raise PrefOptUserError(
                f"compare.loss_overrides.{unknown[0]}: not in compare.losses {losses}"
            )
        names, loss_configs, points = self.sweep
        runs = plan_runs(
            base_config=self.base_ref,
            base_cfg=self.base_cfg,
            output_dir=self.out,
            losses=names,
            loss_configs=loss_configs,
            overrides=self.train_overrides,
            loss_overrides={
                n: loss_overrides.get(points[n].family, [])
                + ([] if points[n].seed is None else [f"seed={points[n].seed}"])
                for n in names
            },
            kto_dataset=s.kto_dataset,
            kto_rows_per_pair=s.kto_rows_per_pair,
            nproc_per_node=s.nproc_per_node,
            build_loss=build_loss,
        )
        for run in runs:
            p = points[run.name]
            run.family, run.strength, run.seed = p.family, p.strength, p.seed
        # Every run's config must be valid before anything is launched.
        for run in runs:
            try:
                merged = _config.load_config(["--config", str(self.base_path), *run.overrides])
                # a dry run writes commands for another machine: no checks of this one
                validate_recipe_config(merged, local=not s.dry_run if local is None else local)
            except PrefOptUserError as e:
                if "no CUDA device" in str(e) and (s.dry_run or s.skip_training):
                    continue
                raise PrefOptUserError(f"run '{run.name}': {e}") from e
            except ValueError as e:
                raise PrefOptUserError(f"run '{run.name}': bad override: {e}") from e
        return runs

    def write_commands(self, runs) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "commands.sh"
        lines = [
            "#!/usr/bin/env bash",
            "# One prefopt_distributed run per loss (generated by prefopt_compare). Each line is an",
            "# independent job: run them in parallel (e.g. one SLURM job each; with several GPUs per",
            "# job use `tune run --nproc_per_node N ...` or compare.nproc_per_node), then evaluate with",
            f"#   tune run prefopt_compare --config <this compare config> output_dir={self.out} compare.skip_training=true",
            "set -euo pipefail",
        ]
        lines += [run.shell for run in runs]
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o755)
        return path

    # ------------------------------------------------------------------ train
    def train(self, runs) -> None:
        """Train the runs that are not finished yet (see :func:`compare.runs.train_runs`)."""
        s = self.s
        todo = runs_to_train(runs, skip_existing=s.skip_existing, resume=s.resume)
        train_runs(
            todo,
            self.out / "launch_logs",
            max_parallel=s.max_parallel,
            nproc=s.nproc_per_node,
            on_cuda=str(read_settings(self.base_cfg).device).startswith("cuda"),
        )

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, runs) -> Dict[str, Any]:
        s, base = self.s, self.base_cfg
        base_settings = read_settings(base)  # the base config's values with their defaults
        missing = [
            r
            for r in runs
            if not (r.run_dir / "torchtune_config.yaml").is_file()
            or _final_checkpoint(r.run_dir) is None
        ]
        if missing:
            r = missing[0]
            raise PrefOptUserError(
                f"run '{r.name}' has no finished training in {r.run_dir} (torchtune_config.yaml and a final "
                f"checkpoint); train it with: {r.shell}"
            )
        device = utils.get_device(device=str(s.device or base_settings.device))
        dtype = training.get_dtype(base_settings.dtype, device=device)
        training.set_seed(seed=base_settings.seed)
        settings = eval_settings(s, base)
        tokenizer = config.instantiate(base.tokenizer)

        heldout_cfg = self._heldout_config()
        heldout = config.instantiate(heldout_cfg, tokenizer=tokenizer)
        if len(heldout) == 0 or "chosen_input_ids" not in heldout[0]:
            raise PrefOptUserError(
                "compare.heldout.dataset must yield paired (chosen/rejected) rows"
            )
        items = [
            heldout[i]
            for i in range(
                len(heldout) if settings.max_rows is None else min(len(heldout), settings.max_rows)
            )
        ]

        own_ref = base_settings.ref_checkpointer is not None
        ref_ck = HFCheckpoint.from_config(
            base.ref_checkpointer if own_ref else base.checkpointer,
            "ref_checkpointer" if own_ref else "checkpointer",
        )
        log.info(f"[compare] reference: {ref_ck.checkpoint_dir}")
        reference = ev.build_eval_model(base.model, ref_ck.load(), device, dtype)

        judge, judge_kind, judge_label = None, None, None
        judge_cfg = s.judge
        if judge_cfg is not None and judge_cfg.get("_component_"):
            try:
                judge, judge_kind = build_judge(judge_cfg, s.judge_kind)
            except ValueError as e:
                raise PrefOptUserError(str(e)) from e
            judge_label = f"{judge_cfg._component_} ({judge_kind})"

        t0 = time.perf_counter()
        evaluator = ev.HeldoutEvaluator(
            tokenizer,
            items,
            reference,
            settings,
            device,
            dtype,
            judge,
            judge_kind,
            gold_reward=self.gold_reward,
        )
        ref_result = evaluator.evaluate(None)
        ref_files = write_eval_files(self.out, "reference", ref_result, 0)
        log.info(f"[compare] reference evaluated in {time.perf_counter() - t0:.0f}s")

        scratch = self.out / ".eval_scratch"
        records = []
        for run in runs:
            t0 = time.perf_counter()
            saved = OmegaConf.load(run.run_dir / "torchtune_config.yaml")
            final = _final_checkpoint(run.run_dir)
            loss_fn = build_loss(saved.loss)
            state = None
            try:
                state = ckpt.load_recipe_state(final)
            except PrefOptUserError:
                pass
            # the run's final/ is read by a checkpointer of the base's kind (its model type)
            weights = ref_ck.reader(final, scratch).load()
            policy = ev.build_eval_model(saved.model, weights, device, dtype)
            result = evaluator.evaluate(policy, loss_fn)
            del policy
            log_dir = Path(
                str(
                    OmegaConf.select(saved, "metric_logger.log_dir", default="")
                    or run.run_dir / "logs"
                )
            )
            curves, log_files = read_run_logs(log_dir)
            eval_files = write_eval_files(
                self.out, run.name, result, int(training_summary(curves, state)["steps"] or 0)
            )
            saved_cfg = OmegaConf.to_container(saved, resolve=False)
            saved_cfg["loss"] = OmegaConf.to_container(saved.loss, resolve=True)
            records.append(
                run_record(
                    run, saved_cfg, loss_fn, final, state, result, curves, log_files, eval_files
                )
            )
            log.info(f"[compare] {run.name} evaluated in {time.perf_counter() - t0:.0f}s")
        shutil.rmtree(scratch, ignore_errors=True)

        generation = (
            "greedy"
            if settings.temperature <= 0
            else f"sampled at temperature {settings.temperature}, top_k {settings.top_k}, seed {settings.generation_seed}"
        )
        return assemble_report(
            title=s.title or "Preference-loss comparison",
            output_dir=self.out,
            settings={
                "base_config": self.base_ref,
                "base_config_file": str(self.base_path),
                # the policy init, read as the recipe reads it (an HF folder or a torchtune dir)
                "base_checkpoint": str(
                    HFCheckpoint.from_config(base.checkpointer, "checkpointer").checkpoint_dir
                ),
                "overrides": self.train_overrides,
                "heldout_dataset": json.dumps(OmegaConf.to_container(heldout_cfg, resolve=True)),
                "heldout_rows": len(items),
                "heldout_prompts": len(evaluator.prompts),
                "generation": f"{generation}, max_new_tokens {settings.max_new_tokens}, the tokenizer's chat template, "
                f"stop tokens {evaluator.stop_tokens}",
                "kl": f"{settings.kl_samples_per_prompt} samples per prompt (temperature 1, seed {settings.kl_seed}), "
                f"max_new_tokens {settings.kl_max_new_tokens}",
                "judge": judge_label,
                "gold_reward": _describe(s.gold_reward)
                or ("the task's (compare.task)" if self.task is not None else None),
                "task": getattr(self, "task_manifest", None),
                "device": str(device),
                "dtype": str(dtype),
            },
            reference={
                "result": ref_result,
                "checkpoint": str(ref_ck.checkpoint_dir),
                "files": ref_files,
            },
            runs=records,
        )


def _describe(node: Any) -> Optional[str]:
    if node is None:
        return None
    if isinstance(node, str):
        return node
    return json.dumps(OmegaConf.to_container(node, resolve=True))


def dotlist_all(node: Any) -> List[str]:
    """A ``{key: value}`` mapping of training overrides as ``key=value`` strings."""
    if node is None:
        return []
    node = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node
    if not isinstance(node, dict):
        raise PrefOptUserError(
            f"overrides must be a mapping of config keys to values, got {node!r}"
        )
    out: List[str] = []
    for k, v in node.items():
        out += dotlist(str(k), v)
    return out


@report_user_errors
@parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = CompareRecipe(cfg)
    if recipe.task is not None:
        recipe.plan(local=False)  # every run's config, before the task's SFT and sampling
    recipe.prepare_task()
    runs = recipe.plan()
    commands = recipe.write_commands(runs)
    log.info(f"[compare] {len(runs)} runs; commands: {commands}")
    if recipe.s.dry_run:
        print(commands.read_text(), flush=True)
        return
    if not recipe.s.skip_training:
        recipe.train(runs)
    report = recipe.evaluate(runs)
    paths = write_report(report, recipe.out)
    print(paths["md"].read_text().split("## Training curves")[0], flush=True)
    print(f"[compare] report: {paths['md']}  {paths['html']}  {paths['json']}", flush=True)


if __name__ == "__main__":
    sys.exit(recipe_main())
