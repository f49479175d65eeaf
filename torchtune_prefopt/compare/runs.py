"""The per-loss training runs of a comparison: their commands, configs and matching checks.

Every loss is trained by the ordinary ``prefopt_distributed`` recipe, launched as::

    tune run [--nproc_per_node N] prefopt_distributed --config <base_config> \\
        output_dir=<output_dir>/<run> [~loss.<old arg> ...] loss._component_=<Loss> loss.<arg>=<v> \\
        <compare.overrides> <compare.loss_overrides.<run>>

so each run is also an ordinary job one can launch anywhere (another node, a SLURM array)
and evaluate later with ``compare.skip_training=true``. Everything a loss does not change
(base weights, data, seed, steps, batch, optimizer, schedule) comes from the one base config,
which is what makes the comparison matched. KTO trains on unpaired rows: the base config's
paired dataset is switched to its unpaired form (:func:`kto_dataset_overrides`) and the
per-process batch multiplied by ``compare.kto_rows_per_pair`` (2: the same completions per
optimizer step as the paired losses).
"""

from __future__ import annotations

import inspect
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.losses import loss_traits
from torchtune_prefopt.plain import to_plain
from torchtune_prefopt.training.distributed import LAUNCHER_ENV


def _logger():
    from torchtune import utils

    return utils.get_logger("INFO")


log = _logger()

__all__ = [
    "DEFAULT_LOSSES",
    "RunSpec",
    "SweepPoint",
    "loss_config",
    "dotlist",
    "expand_sweep",
    "kto_dataset_overrides",
    "loss_label",
    "matched_differences",
    "plan_runs",
    "replace_component",
    "runs_to_train",
    "train_runs",
    "tune_executable",
]

DEFAULT_LOSSES = ("dpo", "ipo", "kto", "simpo")


def _value(v: Any) -> str:
    """A value as torchtune/OmegaConf command-line text."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    s = str(v)
    if "=" in s:
        raise PrefOptUserError(
            f"cannot pass {s!r} on the command line (torchtune overrides cannot contain '=')"
        )
    return s


def dotlist(prefix: str, node: Any) -> List[str]:
    """``{"a": 1, "b": {"c": 2}}`` under ``prefix`` -> ``["prefix.a=1", "prefix.b.c=2"]``."""
    node = to_plain(node, resolve=False)
    if isinstance(node, Mapping):
        out = []
        for k, v in node.items():
            out += dotlist(f"{prefix}.{k}", v)
        return out
    return [f"{prefix}={_value(node)}"]


def loss_label(spec: Any) -> str:
    """``DPOLoss(beta=0.1)``-style label of a loss config."""
    spec = to_plain(spec, resolve=False)
    if isinstance(spec, str):
        return spec
    spec = dict(spec or {})
    comp = str(spec.pop("_component_", spec.pop("name", "?")))
    args = ", ".join(f"{k}={v}" for k, v in spec.items())
    return f"{comp.rsplit('.', 1)[-1]}({args})"


def _component(node: Any) -> Optional[str]:
    node = to_plain(node, resolve=False)
    return node.get("_component_") if isinstance(node, Mapping) else None


def _unpaired_builders() -> tuple:
    """The public dataset builders that yield unpaired (KTO) rows and take no switch."""
    from torchtune_prefopt import data

    return (
        data.unpaired_from_paired,
        data.synthetic_kto_dataset,
        data.kto_dataset,
        data.thumbs_dataset,
    )


def kto_dataset_overrides(dataset_cfg: Any, explicit: Any = None) -> List[str]:
    """Command-line overrides that turn the base config's paired ``dataset`` into KTO rows.

    A builder with an ``unpaired`` switch (every paired builder of this package) gets
    ``dataset.unpaired=true``; a builder that already yields unpaired rows needs nothing.
    ``explicit``: ``compare.kto_dataset`` (a full dataset config) wins when given.
    """
    if explicit is not None:
        return replace_component("dataset", dataset_cfg, explicit)
    comp = _component(dataset_cfg)
    if comp is None:
        raise PrefOptUserError(
            "compare: cannot derive KTO's unpaired dataset from a dataset list; set compare.kto_dataset"
        )
    if to_plain(dataset_cfg, resolve=False).get("unpaired") is True:
        return []
    try:
        from torchtune.config._utils import _get_component_from_path

        builder = _get_component_from_path(comp)
    except Exception:  # noqa: BLE001 - reported below as "don't know"
        builder = None
    if builder is not None:
        try:
            params = inspect.signature(builder).parameters
        except (TypeError, ValueError):
            params = {}
        if "unpaired" in params:
            return ["dataset.unpaired=true"]
        if builder in _unpaired_builders():
            return []
    raise PrefOptUserError(
        f"compare: don't know the unpaired (KTO) form of dataset {comp!r}; set compare.kto_dataset "
        "to a dataset config that yields unpaired rows (e.g. torchtune_prefopt.data.unpaired_from_paired)"
    )


@dataclass
class RunSpec:
    """One loss's training run."""

    name: str
    loss: Any  # loss config (mapping or short name)
    run_dir: Path
    overrides: List[str]
    command: List[str] = field(default_factory=list)
    family: Optional[str] = None  # the compare.losses entry (a sweep has several runs per entry)
    strength: Optional[Tuple[str, float]] = None  # (loss argument, value) of a sweep point
    seed: Optional[int] = None  # the training seed of a compare.seeds run

    @property
    def shell(self) -> str:
        return " ".join(shlex.quote(c) for c in self.command)


def replace_component(key: str, base_node: Any, new_node: Any) -> List[str]:
    """Overrides replacing the component config ``key`` (``base_node`` in the base config) by
    ``new_node``: torchtune's command line cannot delete a component, so every base argument
    the new component does not set is removed (``~key.arg``), then the new one is set."""
    base_node, new_node = to_plain(base_node, resolve=False), to_plain(new_node, resolve=False)
    if isinstance(new_node, str):
        new_node = {"_component_": new_node}
    out = []
    if isinstance(base_node, Mapping):
        out += [f"~{key}.{k}" for k in base_node if k != "_component_" and k not in new_node]
    return out + dotlist(key, new_node)


def _loss_overrides(spec: Any, base_loss: Any) -> List[str]:
    spec = to_plain(spec, resolve=False)
    if isinstance(spec, str):
        spec = {"_component_": spec}
    if not isinstance(spec, Mapping) or not (spec.get("_component_") or spec.get("name")):
        raise PrefOptUserError(f"compare.loss_configs: each loss needs a _component_, got {spec!r}")
    spec = dict(spec)
    if "name" in spec and "_component_" not in spec:
        spec["_component_"] = spec.pop("name")
    return replace_component("loss", base_loss, spec)


def _strength_text(value: float) -> str:
    return f"{float(value):g}"


def loss_config(name: str, loss_configs: Mapping[str, Any]) -> Any:
    """The loss config of the ``compare.losses`` entry ``name``: ``compare.loss_configs.<name>``,
    else, for a registered loss name (built-in or entry point), that loss with its own
    defaults (``{"_component_": <its class>}``); ``None`` for neither."""
    if name in loss_configs:
        return to_plain(loss_configs.get(name), resolve=False)
    from torchtune_prefopt.losses.registry import get_loss_class

    if not isinstance(name, str) or "." in name or ":" in name:
        return None  # a run name, not a registered short name
    try:
        cls = get_loss_class(name)  # the registry's own lookup (case-insensitive)
    except ValueError:  # unknown name (an entry point that fails to load raises ImportError)
        return None
    return {"_component_": f"{cls.__module__}.{cls.__qualname__}"}


def _no_loss_config(name: str, loss_configs: Mapping[str, Any]) -> PrefOptUserError:
    return PrefOptUserError(
        f"compare.losses: {name!r} is not a registered loss and has no "
        f"compare.loss_configs.{name} (have {sorted(loss_configs)})"
    )


@dataclass(frozen=True)
class SweepPoint:
    """Where a run sits in a comparison: its loss (the ``compare.losses`` entry), the swept
    ``(argument, value)`` (``None`` without a sweep) and its training seed (``None``: the
    base config's)."""

    family: str
    strength: Optional[Tuple[str, float]] = None
    seed: Optional[int] = None


def expand_sweep(
    losses: Sequence[str],
    loss_configs: Mapping[str, Any],
    sweep: Optional[Mapping[str, Any]],
    seeds: Optional[Sequence[int]] = None,
) -> Tuple[List[str], Dict[str, Any], Dict[str, SweepPoint]]:
    """``compare.sweep`` (``{loss: {argument: [values]}}``, one argument per loss) and
    ``compare.seeds`` -> the run names, their loss configs and each run's :class:`SweepPoint`.

    Run ``<loss>-<argument><value>`` (e.g. ``dpo-beta0.1``) trains the loss's config
    (:func:`loss_config`: ``compare.loss_configs.<loss>`` or the registered loss's defaults)
    with ``argument`` set to ``value``; losses not in the sweep keep one run named after
    the loss; sweeps of losses that ``losses`` leaves out are ignored. Values must be
    positive numbers, at least one per swept loss. With ``seeds``, every run is trained once
    per seed (``dpo-beta0.1-seed1``, the base config's ``seed`` set to it).
    """
    sweep = to_plain(sweep or {}, resolve=True)
    if not isinstance(sweep, Mapping):
        raise PrefOptUserError(
            f"compare.sweep must be a mapping loss -> {{argument: [values]}}, got {sweep!r}"
        )
    # a sweep of a configured or registered loss that compare.losses leaves out is ignored
    # (as its loss_configs entry is); a name that is neither is a typo
    unknown = sorted(
        n for n in set(sweep) - set(losses) if loss_config(str(n), loss_configs) is None
    )
    if unknown:
        raise PrefOptUserError(
            f"compare.sweep.{unknown[0]}: not a loss of compare.losses {list(losses)}, "
            f"compare.loss_configs {sorted(loss_configs)} or the registered losses"
        )
    seeds = to_plain(seeds, resolve=True)
    if seeds is not None:
        if (
            not isinstance(seeds, (list, tuple))
            or not seeds
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in seeds)
        ):
            raise PrefOptUserError(
                f"compare.seeds must be a non-empty list of integers >= 0, got {seeds!r}"
            )
        if len(set(seeds)) != len(seeds):
            raise PrefOptUserError(f"compare.seeds has duplicates: {list(seeds)}")
    names: List[str] = []
    configs: Dict[str, Any] = {}
    points: Dict[str, SweepPoint] = {}

    def add(name: str, config: Any, point: SweepPoint) -> None:
        for seed in seeds if seeds is not None else [None]:
            run = name if seed is None else f"{name}-seed{seed}"
            names.append(run)
            if config is not None:
                configs[run] = config
            points[run] = SweepPoint(point.family, point.strength, seed)

    for loss in losses:
        base = loss_config(loss, loss_configs)
        if loss not in sweep:
            add(loss, base, SweepPoint(loss))
            continue
        spec = sweep[loss]
        if not isinstance(spec, Mapping) or len(spec) != 1:
            raise PrefOptUserError(
                f"compare.sweep.{loss} must name exactly one loss argument with a list of values, "
                f"e.g. {{beta: [0.05, 0.1, 0.3]}}, got {spec!r}"
            )
        ((arg, values),) = spec.items()
        if not isinstance(values, (list, tuple)) or not values:
            raise PrefOptUserError(
                f"compare.sweep.{loss}.{arg} must be a non-empty list of numbers"
            )
        if base is None:
            raise _no_loss_config(loss, loss_configs)
        if isinstance(base, str):
            base = {"_component_": base}
        seen = set()
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise PrefOptUserError(
                    f"compare.sweep.{loss}.{arg}: {v!r} is not a positive number"
                )
            name = f"{loss}-{arg}{_strength_text(v)}"
            if name in seen:
                raise PrefOptUserError(f"compare.sweep.{loss}.{arg}: {v!r} is listed twice")
            seen.add(name)
            add(name, {**dict(base), arg: float(v)}, SweepPoint(loss, (str(arg), float(v))))
    return names, configs, points


def plan_runs(
    *,
    base_config: str,
    base_cfg: Any,
    output_dir,
    losses: Sequence[str],
    loss_configs: Mapping[str, Any],
    overrides: Sequence[str] = (),
    loss_overrides: Optional[Mapping[str, Sequence[str]]] = None,
    kto_dataset: Any = None,
    kto_rows_per_pair: int = 2,
    nproc_per_node: int = 1,
    tune: str = "tune",
    build_loss=None,
) -> List[RunSpec]:
    """One :class:`RunSpec` per loss name in ``losses`` (the run directory is ``output_dir/<name>``).

    ``base_cfg`` is the base config merged with ``overrides`` (used to find the dataset and
    batch size for KTO). ``build_loss`` (optional) builds each loss config to decide whether
    it is unpaired and to fail early on bad hyper-parameters.
    """
    if not losses:
        raise PrefOptUserError("compare.losses is empty")
    if len(set(losses)) != len(losses):
        raise PrefOptUserError(f"compare.losses has duplicates: {list(losses)}")
    runs = []
    for name in losses:
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise PrefOptUserError(f"compare.losses: {name!r} is not a valid run name")
        if name not in loss_configs:
            raise _no_loss_config(name, loss_configs)
        spec = loss_configs[name]
        paired = True
        if build_loss is not None:
            try:
                loss_obj = build_loss(to_plain(spec, resolve=False))
            except (ValueError, TypeError, ImportError) as e:
                raise PrefOptUserError(f"compare.loss_configs.{name}: {e}") from e
            paired = loss_traits(loss_obj).paired
        run_dir = Path(output_dir) / name
        ov = [f"output_dir={run_dir}"] + _loss_overrides(spec, base_cfg.get("loss"))
        ov += list(overrides)
        if not paired:
            # after the common overrides, from which they are derived (``base_cfg`` holds
            # them): a batch_size in compare.train_overrides must not undo KTO's
            # kto_rows_per_pair x batch (the same completions per step)
            ov += kto_dataset_overrides(base_cfg.get("dataset"), kto_dataset)
            bs = base_cfg.get("batch_size")
            if isinstance(bs, int) and kto_rows_per_pair > 1:
                ov.append(f"batch_size={bs * int(kto_rows_per_pair)}")
        ov += list((loss_overrides or {}).get(name, []) or [])
        cmd = [tune, "run"]
        if nproc_per_node and int(nproc_per_node) > 1:
            cmd += ["--nproc_per_node", str(int(nproc_per_node))]
        cmd += ["prefopt_distributed", "--config", str(base_config), *ov]
        runs.append(
            RunSpec(
                name=name,
                loss=to_plain(spec, resolve=False),
                run_dir=run_dir,
                overrides=ov,
                command=cmd,
            )
        )
    return runs


# --------------------------------------------------------------------------- launching


def tune_executable() -> List[str]:
    """How to call ``tune``: the one next to this interpreter, else the one on PATH, else
    ``python -m torchtune._cli.tune``."""
    exe = Path(sys.executable).parent / "tune"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("tune")
    if found:
        return [found]
    return [sys.executable, "-m", "torchtune._cli.tune"]


def runs_to_train(runs: Sequence[RunSpec], *, skip_existing: bool, resume: bool) -> List[RunSpec]:
    """The runs that still need training: finished runs (a ``final`` link) are skipped with
    ``skip_existing`` or ``resume``; an interrupted run continues from its newest checkpoint
    with ``resume``; any other non-empty run directory is an error (never overwritten)."""
    from torchtune_prefopt.training import checkpoints as ckpt

    todo = []
    for run in runs:
        finished = (run.run_dir / "final").exists()
        if (skip_existing or resume) and finished:
            log.info(
                f"[compare] {run.name}: {run.run_dir} already has a final checkpoint; not retrained"
            )
            continue
        if run.run_dir.exists() and any(run.run_dir.iterdir()):
            if resume and ckpt.latest_checkpoint(run.run_dir) is not None:
                # an interrupted run (e.g. pre-empted): continue from its newest checkpoint
                run.command = run.command + ["resume_from_checkpoint=true"]
                todo.append(run)
                continue
            raise PrefOptUserError(
                f"{run.run_dir} already exists and is not empty: use a new output_dir, "
                "compare.skip_existing=true (keep finished runs), compare.resume=true (also continue "
                "interrupted runs from their newest checkpoint) or compare.skip_training=true (evaluate only)"
            )
        todo.append(run)
    return todo


def _gpu_slots(max_parallel: int, nproc: int, on_cuda: bool) -> List[Optional[str]]:
    """``CUDA_VISIBLE_DEVICES`` for each of ``max_parallel`` concurrent runs (``None``: leave it)."""
    import torch

    if not (max_parallel > 1 and on_cuda and torch.cuda.is_available()):
        return [None] * max_parallel
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if len(gpus) < max_parallel * nproc:
        raise PrefOptUserError(
            f"compare.max_parallel={max_parallel} runs x nproc_per_node={nproc} need "
            f"{max_parallel * nproc} GPUs, {len(gpus)} visible"
        )
    return [",".join(gpus[k * nproc : (k + 1) * nproc]) for k in range(max_parallel)]


def _cpu_threads(max_parallel: int, nproc: int, on_cuda: bool) -> Optional[str]:
    """``OMP_NUM_THREADS`` for concurrent CPU runs: the cores split between the processes
    (torch's default, one thread per core in every process, oversubscribes the cores, and
    spinning OpenMP threads then slow each run several-fold); ``None``: leave it (one run at
    a time, GPU runs, or a user-set ``OMP_NUM_THREADS``)."""
    if on_cuda or max_parallel * nproc <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return str(max(1, int(cores or 1) // (max_parallel * nproc)))


def train_runs(
    todo: Sequence[RunSpec],
    launch_dir: Path,
    *,
    max_parallel: int = 1,
    nproc: int = 1,
    on_cuda: bool = False,
) -> None:
    """Launch the runs as ``tune run`` subprocesses, ``max_parallel`` at a time; each one's
    output goes to ``launch_dir/<run>.log``.

    With several at a time on GPUs, run k gets its own ``nproc`` GPUs through
    ``CUDA_VISIBLE_DEVICES``; on CPU the cores are split (``OMP_NUM_THREADS``). If a run fails, the ones still running get SIGTERM (the
    training recipe then saves a resumable checkpoint and exits) and the error names the
    failed run's output file.
    """
    launch_dir.mkdir(parents=True, exist_ok=True)
    base_env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    tune = tune_executable()
    todo = list(todo)
    max_parallel = max(1, int(max_parallel))
    gpu_slots = _gpu_slots(max_parallel, int(nproc), on_cuda)
    cpu_threads = _cpu_threads(max_parallel, int(nproc), on_cuda)
    running: Dict[int, tuple] = {}  # slot -> (run, proc, file, t0, log_path)
    failed = None
    try:
        while (todo and failed is None) or running:
            while todo and failed is None and len(running) < max_parallel:
                slot = next(k for k in range(max_parallel) if k not in running)
                run = todo.pop(0)
                env = dict(base_env)
                if gpu_slots[slot] is not None:
                    env["CUDA_VISIBLE_DEVICES"] = gpu_slots[slot]
                if cpu_threads is not None:
                    env["OMP_NUM_THREADS"] = cpu_threads
                log_path = launch_dir / f"{run.name}.log"
                gpus = f" on GPUs {gpu_slots[slot]}" if gpu_slots[slot] is not None else ""
                log.info(
                    f"[compare] training {run.name}{gpus}: {run.shell}\n          output: {log_path}"
                )
                fh = open(log_path, "w")
                proc = subprocess.Popen(
                    tune + run.command[1:], stdout=fh, stderr=subprocess.STDOUT, env=env
                )
                running[slot] = (run, proc, fh, time.perf_counter(), log_path)
            time.sleep(0.5)
            for slot, (run, proc, fh, t0, log_path) in list(running.items()):
                if proc.poll() is None:
                    continue
                fh.close()
                del running[slot]
                if proc.returncode != 0 and failed is None:
                    failed = (run, proc.returncode, log_path)
                    for _, p2, *_ in running.values():
                        p2.terminate()  # SIGTERM: the recipe checkpoints and exits
                elif proc.returncode == 0:
                    log.info(f"[compare] {run.name} done in {time.perf_counter() - t0:.0f}s")
    finally:
        for _, p2, fh2, *_ in running.values():
            p2.kill()
            fh2.close()
    if failed is not None:
        run, code, log_path = failed
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise RuntimeError(
            f"training run '{run.name}' failed (exit {code}); full output in {log_path}; last lines:\n{tail}"
        )


# Settings that must agree between runs for the comparison to be matched.
_MATCHED_KEYS = (
    "seed",
    "epochs",
    "max_steps_per_epoch",
    "gradient_accumulation_steps",
    "optimizer",
    "lr_scheduler",
    "clip_grad_norm",
    "model",
    "checkpointer.checkpoint_dir",
    "checkpointer.checkpoint_files",
    "tokenizer",
    "dtype",
    "shuffle",
)


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def matched_differences(
    configs: Mapping[str, Mapping[str, Any]],
    steps: Mapping[str, Optional[int]],
    rows_per_step: Mapping[str, Optional[float]],
    ignore: Sequence[str] = (),
) -> List[str]:
    """Human-readable differences between the runs' saved configs (``torchtune_config.yaml``)
    in the settings that make a comparison matched, plus trained steps and completions per step.
    ``ignore``: keys that differ on purpose (``seed`` with ``compare.seeds``)."""
    diffs = []
    names = list(configs)
    if not names:
        return diffs
    for key in _MATCHED_KEYS:
        if key in ignore:
            continue
        values = {n: _get(configs[n], key) for n in names}
        if len({repr(v) for v in values.values()}) > 1:
            diffs.append(f"{key} differs: " + ", ".join(f"{n}={values[n]!r}" for n in names))
    if len(set(steps.values())) > 1:
        diffs.append("optimizer steps differ: " + ", ".join(f"{n}={steps[n]}" for n in names))
    if len(set(rows_per_step.values())) > 1:
        diffs.append(
            "completions per optimizer step differ: "
            + ", ".join(f"{n}={rows_per_step[n]}" for n in names)
        )
    return diffs
