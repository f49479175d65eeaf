"""The one harness for tests that run the recipes: `tune run` subprocesses and in-process recipes.

* :func:`clean_env` / :func:`tune`: a ``tune`` subprocess of the installed package with a clean
  environment (no inherited PYTHONPATH or torchrun variables, one intra-op thread: the same
  kernels on 1 and 2 processes, and the CI machine has 2 shared cores).
* :func:`recipe_args` / :func:`run_recipe`: the one spelling of a recipe launch,
  ``tune run [--nproc_per_node N] <recipe> --config <config> <overrides>``; every test (and
  :class:`RunPool`) launches runs through it. :data:`CPU_FP32`, :data:`NO_EVAL` and
  :func:`short_run` are the overrides test runs share.
* :func:`tiny_config`: ``configs/tiny/<loss>.yaml`` made tiny (a few synthetic rows, 64
  tokens, no held-out eval) for one test's own directory.
* :func:`log_rows` / :func:`step_metrics`: the DiskLogger metric lines, read with the library's
  own parser (:func:`torchtune_prefopt.compare.metrics.iter_disk_log`).
* :class:`RunPool`: runs that several tests read, started ahead of time ``JOBS`` at a time
  (each is a fresh interpreter: seconds of CPU for the torch/torchtune imports alone).
* :func:`recipe_in_process`: a set-up ``PrefOptRecipe`` in this process (config and data
  checks without a subprocess), with the environment and SIGTERM handler restored after.

Import it as ``import tune_harness`` (pyproject puts ``tests/`` on pytest's ``pythonpath``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from torchtune_prefopt.training.distributed import LAUNCHER_ENV

REPO = Path(__file__).resolve().parents[1]
TUNE = Path(sys.executable).parent / "tune"
RUN_TIMEOUT = 900  # seconds per run; generous because the CPUs are shared
#: runs a module's pool starts at once (tests/conftest.py sets 1 on each parallel worker)
JOBS = max(1, int(os.environ.get("PREFOPT_TEST_JOBS", "2")))

#: variables of torchrun / a parent recipe that must not leak into a child run
DIST_ENV = LAUNCHER_ENV  # the library's list
#: metrics that depend on wall time or process memory, not on the maths
VOLATILE = {"tokens_per_second", "peak_memory_gib"}


def synthetic_file(split: str = "train") -> Path:
    from torchtune_prefopt.data import synthetic_data_file

    return synthetic_data_file(split)


# ----------------------------------------------------------------------------- environment
def clean_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    for key in ("PYTHONPATH", "PREFOPT_DEBUG", "TORCH_COMPILE_BACKEND", *DIST_ENV):
        env.pop(key, None)
    env["OMP_NUM_THREADS"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.update(extra or {})
    return env


def run_process(
    cmd: Sequence[object],
    cwd: Path,
    env: Optional[Dict[str, str]] = None,
    timeout: float = RUN_TIMEOUT,
) -> subprocess.CompletedProcess:
    """``cmd`` in ``cwd`` with :func:`clean_env` (+ ``env``); output captured as text."""
    return subprocess.run(
        [str(a) for a in cmd],
        cwd=cwd,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tune(
    args: Sequence[object],
    cwd: Path,
    env: Optional[Dict[str, str]] = None,
    timeout: float = RUN_TIMEOUT,
) -> subprocess.CompletedProcess:
    """``tune <args>`` (the installed CLI next to this interpreter) in ``cwd``."""
    assert TUNE.exists(), f"`tune` not found next to {sys.executable}"
    return run_process([TUNE, *args], cwd, env, timeout)


def recipe_args(
    config: object, *overrides: object, nproc: int = 1, recipe: str = "prefopt_distributed"
) -> List[str]:
    """``run [--nproc_per_node N] <recipe> --config <config> <overrides>``: ``tune``'s
    arguments for one recipe launch (N > 1: torchrun)."""
    launcher = ["--nproc_per_node", str(nproc)] if nproc > 1 else []
    return ["run", *launcher, recipe, "--config", str(config), *(str(o) for o in overrides)]


def run_recipe(
    config: object,
    *overrides: object,
    cwd: Path,
    nproc: int = 1,
    env: Optional[Dict[str, str]] = None,
    timeout: float = RUN_TIMEOUT,
    recipe: str = "prefopt_distributed",
) -> subprocess.CompletedProcess:
    """:func:`recipe_args` run by the installed ``tune`` in ``cwd`` (output captured)."""
    return tune(recipe_args(config, *overrides, nproc=nproc, recipe=recipe), cwd, env, timeout)


#: the device and dtype every CPU test run uses (the packaged real-model configs say cuda/bf16)
CPU_FP32 = ("device=cpu", "dtype=fp32")
#: no held-out evaluation
NO_EVAL = ("eval_dataset=null",)


def short_run(steps: int, seq_len: Optional[int] = None) -> tuple:
    """A run of ``steps`` optimizer steps, one micro-batch each, a metric line per step, no
    periodic save and no lr warm-up (step 1 would otherwise use lr 0)."""
    return (
        f"max_steps_per_epoch={steps}",
        "epochs=1",
        "gradient_accumulation_steps=1",
        "log_every_n_steps=1",
        "save_every_n_steps=null",
        *(() if seq_len is None else (f"tokenizer.max_seq_len={seq_len}",)),
        "lr_scheduler.num_warmup_steps=0",
    )


def describe(proc, n: int = 5000) -> str:
    """Exit code and the tails of stderr/stdout of a finished process, for assertion messages."""
    return (
        f"exit {proc.returncode}\n--- stderr (tail) ---\n{(proc.stderr or '')[-n:]}"
        f"\n--- stdout (tail) ---\n{(proc.stdout or '')[-1500:]}"
    )


# ----------------------------------------------------------------------------- data and configs
def synthetic_rows(n: int, split: str = "train") -> List[dict]:
    lines = synthetic_file(split).read_text().splitlines()[:n]
    assert len(lines) == n, f"only {len(lines)} synthetic {split} rows"
    return [json.loads(x) for x in lines]


def byte_llama3_tokenizer(workdir: Path, max_seq_len: Optional[int] = None):
    """torchtune's real Llama-3 tokenizer (chat template, BOS, header and eot/eos special
    tokens) over a 256-token byte-level tiktoken file written to ``workdir``: no download."""
    import base64

    from torchtune.models.llama3 import llama3_tokenizer  # tiktoken: a torchtune dependency

    path = Path(workdir) / "bytes.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    return llama3_tokenizer(str(path), max_seq_len=max_seq_len)


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(workdir: Path, name: str = "dpo", rows: int = 8, **edits) -> Path:
    """``configs/tiny/<name>.yaml`` made tiny, written to ``workdir/config.yaml``.

    ``rows`` synthetic pairs in ``workdir/train.jsonl`` (KTO: through ``unpaired_from_paired``,
    ``2 * rows`` unpaired rows), output in
    ``workdir/out``, base checkpoint ``workdir/base``, 64 tokens, no held-out eval; then
    ``edits`` (dotted keys, e.g. ``**{"loss.beta": 1e6}``; a value ``None`` sets null).
    """
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "configs" / "tiny" / f"{name}.yaml")
    cfg.pop("eval_dataset", None)
    cfg.output_dir = str(workdir / "out")
    cfg.checkpointer.checkpoint_dir = str(workdir / "base")
    cfg.tokenizer.max_seq_len = 64
    data = write_jsonl(workdir / "train.jsonl", synthetic_rows(rows))
    component = "unpaired_from_paired" if name.startswith("kto") else "preference_dataset"
    cfg.dataset = {
        "_component_": f"torchtune_prefopt.data.{component}",
        "source": "json",
        "data_files": str(data),
    }
    for key, value in edits.items():
        OmegaConf.update(cfg, key, value, merge=False)
    path = workdir / "config.yaml"
    OmegaConf.save(cfg, path)
    return path


def load_weights(ckpt_dir: Path, adapter: bool = False) -> dict:
    """The model weights (``adapter=True``: the adapter weights) of an HF checkpoint directory."""
    from safetensors.torch import load_file

    if adapter:
        files = sorted(ckpt_dir.glob("adapter_model*.safetensors"))
    else:
        files = sorted(
            p for p in ckpt_dir.glob("*.safetensors") if not p.name.startswith("adapter")
        )
    assert files, (
        f"no {'adapter ' if adapter else ''}safetensors in {ckpt_dir}: {sorted(os.listdir(ckpt_dir))}"
    )
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


# ----------------------------------------------------------------------------- metric logs
def log_rows(out_dir: Path) -> List[Dict[str, float]]:
    """Every ``Step N | ...`` line of every DiskLogger file under ``out_dir/logs``, in file
    order (a resumed run appends a new file), each with its ``step``."""
    from torchtune_prefopt.compare.metrics import iter_disk_log

    rows = []
    for f in sorted((Path(out_dir) / "logs").glob("*.txt")):
        for step, metrics in iter_disk_log(f):
            rows.append({**metrics, "step": step})
    return rows


def step_metrics(out_dir: Path) -> Tuple[Dict[int, Dict[str, float]], Dict[int, Dict[str, float]]]:
    """``(train, eval)``: ``{step: {metric: value}}`` of the run's single DiskLogger file (eval
    lines carry only ``eval/*`` keys). A step logged twice is an error."""
    from torchtune_prefopt.compare.metrics import iter_disk_log

    logs = sorted((Path(out_dir) / "logs").glob("log_*.txt"))
    assert len(logs) == 1, f"expected one DiskLogger file, got {logs}"
    train: Dict[int, Dict[str, float]] = {}
    evals: Dict[int, Dict[str, float]] = {}
    for step, metrics in iter_disk_log(logs[0]):
        target = evals if any(k.startswith("eval/") for k in metrics) else train
        assert step not in target, f"step {step} logged twice in {logs[0]}"
        target[step] = metrics
    return train, evals


def assert_steps_match(
    a: Dict[int, Dict[str, float]],
    b: Dict[int, Dict[str, float]],
    what: str,
    rel: float,
    abs_: float,
    steps: Optional[Sequence[int]] = None,
    skip: Sequence[str] = (),
) -> float:
    """Every non-volatile metric of ``b`` equals ``a``'s at each step; returns the largest
    absolute difference seen."""
    import pytest

    steps = sorted(b) if steps is None else list(steps)
    worst = 0.0
    for step in steps:
        assert step in a and step in b, f"{what}: step {step} missing ({sorted(a)} / {sorted(b)})"
        keys = set(a[step]) - VOLATILE - set(skip)
        assert keys <= set(b[step]), f"{what}: step {step}: {sorted(keys - set(b[step]))} missing"
        for key in sorted(keys):
            x, y = a[step][key], b[step][key]
            worst = max(worst, abs(x - y))
            assert y == pytest.approx(x, rel=rel, abs=abs_), (
                f"{what}: step {step} {key}: {y} vs {x}"
            )
    return worst


def assert_same_training(
    a: Dict, b: Dict, base: Dict, what: str, max_abs: float = 1e-4, max_rel: float = 1e-3
) -> None:
    """Two runs' final weights agree: every tensor within ``max_abs``, and the two weight
    updates (final - base, all tensors together) differ by < ``max_rel`` of the update.

    Not bit-equal across process counts: FSDP2 reduce-scatters gradients (another summation
    order), and Adam turns float noise in (near-)zero gradients into lr-sized steps (the
    k_proj biases: softmax is shift-invariant, so their true gradient is 0)."""
    assert sorted(a) == sorted(b) == sorted(base), f"{what}: different weight names"
    num = den = 0.0
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, f"{what}: {k}"
        diff = (a[k] - b[k]).abs().max().item()
        assert diff <= max_abs, f"{what}: {k} differs by up to {diff:.3g} (> {max_abs})"
        num += (a[k] - b[k]).double().pow(2).sum().item()
        den += (b[k] - base[k]).double().pow(2).sum().item()
    assert den > 0, f"{what}: the weights did not change during training"
    rel = (num / den) ** 0.5
    assert rel <= max_rel, f"{what}: updates differ by {rel:.3g} of the update norm (> {max_rel})"


# ----------------------------------------------------------------------------- run pool
@dataclass(frozen=True)
class RunSpec:
    key: str
    config: str = "tiny/dpo"
    overrides: tuple = ()
    nproc: int = 1
    env: tuple = ()  # (name, value) pairs
    # a finished run whose output_dir paths ``seed_paths`` are copied into this run's first
    seed_from: Optional[str] = None
    seed_paths: tuple = ()
    # (run_dir) -> extra environment; called in the worker right before launching
    prepare: Optional[Callable[[Path], dict]] = field(default=None, compare=False)
    # a Python script instead of `tune run` (argv[1]: json {"config", "overrides"})
    script: Optional[str] = None
    # anything the module's override function wants to know (e.g. "eval")
    tags: tuple = ()

    @property
    def deps(self) -> tuple:
        return (self.seed_from,) if self.seed_from else ()


@dataclass
class RunResult:
    spec: RunSpec
    cmd: List[str]
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path
    out_dir: Path
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + "\n" + self.stderr

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.output.strip().splitlines()[-n:])

    def check(self) -> "RunResult":
        assert self.returncode == 0, (
            f"run {self.spec.key} failed (exit {self.returncode}): {' '.join(self.cmd)}\n{self.tail()}"
        )
        assert "Traceback" not in self.stderr, (
            f"{self.spec.key}: traceback on stderr\n{self.tail()}"
        )
        return self

    def steps(self) -> Dict[int, Dict[str, float]]:
        return step_metrics(self.out_dir)[0]

    def evals(self) -> Dict[int, Dict[str, float]]:
        return step_metrics(self.out_dir)[1]

    def losses(self) -> List[float]:
        steps = self.steps()
        return [steps[s]["loss"] for s in sorted(steps)]

    @property
    def final(self) -> Path:
        return self.out_dir / "final"


class RunPool:
    """Runs specs in background threads (``JOBS`` at a time); ``get`` waits for one.

    ``overrides(spec, out_dir)`` gives each run's ``key=value`` arguments (the module's common
    settings, data files, ``output_dir``...). Runs write only into their own directory
    ``root/<key>``; one seeded from another copies files first.
    """

    def __init__(
        self,
        root: Path,
        specs: Dict[str, RunSpec],
        overrides: Callable[[RunSpec, Path], Sequence[str]],
    ):
        self.root, self.specs, self.overrides = root, specs, overrides
        self._futures: Dict[str, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=JOBS, thread_name_prefix="tune-run")

    def submit(self, key: str) -> Future:
        with self._lock:
            return self._submit_locked(key)

    def _submit_locked(self, key: str) -> Future:
        if key not in self._futures:
            spec = self.specs[key]
            deps = [self._submit_locked(d) for d in spec.deps]  # FIFO: deps start first
            self._futures[key] = self._pool.submit(self._run, spec, deps)
        return self._futures[key]

    def get(self, key: str) -> RunResult:
        return self.submit(key).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def timings(self) -> List[tuple]:
        return [
            (k, f.result().seconds, f.result().returncode)
            for k, f in self._futures.items()
            if f.done() and f.exception() is None
        ]

    def summary(self) -> str:
        return ", ".join(
            f"{k} {s:.0f}s" + ("" if rc == 0 else f" (exit {rc})") for k, s, rc in self.timings()
        )

    def _run(self, spec: RunSpec, deps: Sequence[Future]) -> RunResult:
        for d in deps:
            d.result()
        run_dir = self.root / spec.key
        run_dir.mkdir(parents=True)
        out_dir = run_dir / "out"
        if spec.seed_from:
            src = self.get(spec.seed_from).check().out_dir
            for rel in spec.seed_paths:
                shutil.copytree(src / rel, out_dir / rel)
        env = dict(spec.env)
        if spec.prepare:
            env.update(spec.prepare(run_dir))
        args = list(self.overrides(spec, out_dir))
        if spec.script is not None:
            script = run_dir / "script.py"
            script.write_text(spec.script)
            cmd = [
                sys.executable,
                str(script),
                json.dumps({"config": spec.config, "overrides": args}),
            ]
        else:
            cmd = [str(TUNE), *recipe_args(spec.config, *args, nproc=spec.nproc)]
        start = time.perf_counter()
        # own process group: on a timeout, torchrun's workers are killed with it
        proc = subprocess.Popen(
            cmd,
            cwd=run_dir,
            env=clean_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            rc, stderr = -9, stderr + f"\nTIMEOUT after {RUN_TIMEOUT}s"
        seconds = time.perf_counter() - start
        (run_dir / "stdout.txt").write_text(stdout)
        (run_dir / "stderr.txt").write_text(stderr)
        return RunResult(spec, cmd, rc, stdout, stderr, run_dir, out_dir, seconds)


def uses_runs(*keys):
    """Declare which pool runs a test reads, so the module's pool can start them before the
    test is reached: run keys, or one callable of the test's parameters returning them."""

    def deco(test):
        test._tune_runs = keys[0] if len(keys) == 1 and callable(keys[0]) else tuple(keys)
        return test

    return deco


def wanted_runs(request) -> List[str]:
    """The run keys declared with :func:`uses_runs` by the selected tests of the requesting
    module, in test order."""
    wanted: List[str] = []
    for item in request.session.items:
        declared = getattr(getattr(item, "function", None), "_tune_runs", None)
        if declared is None or item.module is not request.module:
            continue
        keys = (
            declared(**(item.callspec.params if hasattr(item, "callspec") else {}))
            if callable(declared)
            else declared
        )
        wanted += [k for k in keys if k not in wanted]
    return wanted


# ----------------------------------------------------------------------------- in process
def load_recipe_module(name: str = "prefopt_distributed"):
    """The installed recipe file as a fresh module, to run it in this process (its ``run``,
    ``PrefOptRecipe``); config validation is the library's (``training.recipe_config``)."""
    import torchtune_prefopt

    path = Path(torchtune_prefopt.__file__).parent / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_{name}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _recipe_process_state() -> Iterator[None]:
    """What a one-process recipe changes in this process, put back afterwards: RANK /
    LOCAL_RANK / WORLD_SIZE (set by its process group) and the SIGTERM handler."""
    import torch.distributed as dist

    if dist.is_initialized():
        import pytest

        pytest.skip("a process group is already initialised in this pytest process")
    old_handler = signal.getsignal(signal.SIGTERM)
    old_env = {k: os.environ.get(k) for k in DIST_ENV}
    for k in DIST_ENV:  # a leftover RANK would take the torchrun path
        os.environ.pop(k, None)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        signal.signal(signal.SIGTERM, old_handler)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_in_process(cfg) -> None:
    """The recipe's ``run(cfg)`` (what ``tune run`` runs after parsing) in this process: a
    user error raises :class:`~torchtune_prefopt.errors.PrefOptUserError` with the message
    ``tune run`` would print after ``error:``."""
    module = load_recipe_module()
    with _recipe_process_state():
        module.run(cfg)


@contextlib.contextmanager
def recipe_in_process(cfg, setup: bool = True) -> Iterator[object]:
    """A ``PrefOptRecipe`` built (and set up) in this process; cleaned up afterwards.

    A one-process recipe initialises a process group, sets RANK/LOCAL_RANK/WORLD_SIZE and
    installs a SIGTERM handler: all put back when the block ends.
    """
    module = load_recipe_module()
    with _recipe_process_state():
        recipe = module.PrefOptRecipe(cfg)
        try:
            if setup:
                recipe.setup()
            yield recipe
        finally:
            recipe.cleanup()
