"""Bad input is caught before training, through the real ``tune`` CLI.

Every case runs ``tune run prefopt_distributed --config <cfg.yaml> [overrides]`` in a
subprocess whose working directory, output dir and base checkpoint dir are inside the
case's own folder, and checks:

* errors: exit status 2, exactly one ``error: ...`` line on stderr naming the key / file /
  row, no Python traceback anywhere in the output, and nothing written (no ``logs``, no
  new checkpoint, no ``torchtune_config.yaml``);
* warnings (identical chosen/rejected rows, SimPO with a ``ref_checkpointer``): the run
  trains its one step and exits 0, and the warning is printed.

The table is docs/troubleshooting.md's table. Each case costs one interpreter start (about
9 s of CPU for the torch/torchtune imports), so the selected cases are launched by one
module fixture, ``PREFOPT_TEST_JOBS`` (default 2) at a time, and each test then checks its
own result.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from tune_harness import JOBS, synthetic_rows, tiny_config, tune, write_jsonl

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- helpers
_jsonl = write_jsonl


def _good_rows(n: int = 8) -> List[dict]:
    return synthetic_rows(n)


def _kto_rows(n: int = 8, labels: Optional[List[bool]] = None) -> List[dict]:
    rows = []
    for i, r in enumerate(_good_rows(n)):
        good = labels[i] if labels is not None else i % 2 == 0
        rows.append(
            {
                "prompt": r["prompt"],
                "completion": r["chosen"] if good else r["rejected"],
                "label": good,
            }
        )
    return rows


def _write_config(case_dir: Path, loss: str, edits: Dict[str, object]) -> Path:
    """configs/tiny/<loss>.yaml, made tiny (8 rows, batch 4, 1 step, no eval), plus ``edits``."""
    settings = {"batch_size": 4, "epochs": 1, "max_steps_per_epoch": 1}
    return tiny_config(case_dir, loss, rows=8, **{**settings, **edits})


def _make_step_checkpoint(case_dir: Path, base: Path, state: dict, step: int = 2) -> Path:
    """A complete step checkpoint in case_dir/out, written with the library's own atomic writer
    (the base weights, a recipe_state.pt with ``state``, the manifest)."""
    import torch

    from torchtune_prefopt.training import checkpoints as ckpt

    tmp = ckpt.begin_checkpoint(case_dir / "out", step)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(base / name, tmp / name)
    if isinstance(state, dict):
        torch.save(state, tmp / ckpt.RECIPE_STATE)
    else:  # raw bytes (e.g. a pickle that is not weights-only)
        (tmp / ckpt.RECIPE_STATE).write_bytes(state)
    return ckpt.commit_checkpoint(tmp, step, extra={"reason": "test"})


def _recipe_state(batch_size: int = 4, world_size: int = 1, accum: int = 1) -> dict:
    import torch

    return {
        "step": 2,
        "epoch": 0,
        "micro_in_epoch": 2 * accum,
        "seed": 42,
        "world_size": world_size,
        "batch_size": batch_size,
        "gradient_accumulation_steps": accum,
        "rng_states": [torch.get_rng_state()],
    }


class _Evil:
    """Pickles to ``os.mkdir(<marker>)``: loading it without weights_only would run it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _other_dims_checkpoint(path: Path) -> Path:
    """An HF Qwen2 checkpoint like the tiny one but hidden size 32 (the tiny model has 64)."""
    import torch
    from transformers import Qwen2ForCausalLM

    from torchtune_prefopt.models.tiny import tiny_hf_config

    config = tiny_hf_config()
    config.hidden_size = 32
    config.intermediate_size = 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(path))
    return path


# ----------------------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    loss: str = "dpo"
    edits: Dict[str, object] = field(default_factory=dict)  # applied to the YAML
    overrides: List[str] = field(default_factory=list)  # key=value on the command line
    setup: Optional[Callable[[Path, Path], Dict[str, object]]] = (
        None  # (case_dir, base) -> more edits
    )
    expect: List[str] = field(default_factory=list)  # substrings of the one error line
    warn: Optional[List[str]] = None  # a warning case: exit 0, these substrings in the output
    preexisting_checkpoint: bool = False


def _data(
    rows_fn: Callable[[], List[dict]],
    component: str = "torchtune_prefopt.data.preference_dataset",
    key: str = "dataset",
):
    def setup(case_dir: Path, base: Path) -> Dict[str, object]:
        f = _jsonl(case_dir / f"{key}.jsonl", rows_fn())
        return {key: {"_component_": component, "source": "json", "data_files": str(f)}}

    return setup


def _rows_with(i: int, **changes) -> Callable[[], List[dict]]:
    def rows() -> List[dict]:
        out = _good_rows(8)
        for k, v in changes.items():
            if v is _DROP:
                out[i].pop(k)
            else:
                out[i][k] = v
        return out

    return rows


_DROP = object()


def _truncated_base(case_dir: Path, base: Path) -> Dict[str, object]:
    f = case_dir / "base" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 3])
    return {}


def _mismatched_ref(case_dir: Path, base: Path) -> Dict[str, object]:
    ref = _other_dims_checkpoint(case_dir / "ref32")
    return {
        "ref_checkpointer": {
            "_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": str(ref),
            "checkpoint_files": ["model.safetensors"],
            "model_type": "QWEN2",
            "output_dir": str(case_dir / "ref_out"),
        }
    }


def _simpo_with_ref(case_dir: Path, base: Path) -> Dict[str, object]:
    # Points at weights of the WRONG shape: the run can only succeed if they are not loaded.
    return _mismatched_ref(case_dir, base)


def _resume_other_batch(case_dir: Path, base: Path) -> Dict[str, object]:
    _make_step_checkpoint(case_dir, case_dir / "base", _recipe_state(batch_size=8))
    return {"resume_from_checkpoint": True}


def _resume_pickle(case_dir: Path, base: Path) -> Dict[str, object]:
    import io

    import torch

    state = _recipe_state()
    state["evil"] = _Evil(str(case_dir / "PWNED"))
    buf = io.BytesIO()
    torch.save(state, buf)
    _make_step_checkpoint(case_dir, case_dir / "base", buf.getvalue())
    return {"resume_from_checkpoint": True}


def _resume_truncated(case_dir: Path, base: Path) -> Dict[str, object]:
    final = _make_step_checkpoint(case_dir, case_dir / "base", _recipe_state())
    f = final / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 1000)
    return {"resume_from_checkpoint": True}


def _resume_corrupt_header(case_dir: Path, base: Path) -> Dict[str, object]:
    final = _make_step_checkpoint(case_dir, case_dir / "base", _recipe_state())
    f = final / "model.safetensors"
    with open(f, "r+b") as fh:  # same size, garbage header length
        fh.write(b"\xff" * 8)
    return {"resume_from_checkpoint": True}


KTO_DS = "torchtune_prefopt.data.kto_dataset"

CASES = [
    # -- config keys and hyper-parameters
    Case(
        "unknown_loss",
        overrides=["loss._component_=dpoo"],
        expect=["loss: unknown loss 'dpoo'", "valid:", "dpo", "kto", "simpo"],
    ),
    Case("beta_zero", overrides=["loss.beta=0"], expect=["loss.beta must be > 0, got 0"]),
    Case(
        "label_smoothing_0.5",
        overrides=["loss.label_smoothing=0.5"],
        expect=["loss.label_smoothing must be in [0, 0.5), got 0.5"],
    ),
    Case(
        "simpo_gamma_negative",
        loss="simpo",
        overrides=["loss.gamma=-1"],
        expect=["loss.gamma must be >= 0"],
    ),
    Case("ipo_tau_zero", loss="ipo", overrides=["loss.tau=0"], expect=["loss.tau must be > 0"]),
    Case(
        "unknown_key_typo",
        overrides=["batch_sise=4"],
        expect=["unknown config key 'batch_sise'", "did you mean 'batch_size'"],
    ),
    Case(
        "batch_size_zero",
        overrides=["batch_size=0"],
        expect=["batch_size must be an integer >= 1, got 0"],
    ),
    Case(
        "bad_dtype", overrides=["dtype=fp16"], expect=["dtype must be 'fp32' or 'bf16', got 'fp16'"]
    ),
    Case(
        "bad_nonfinite",
        overrides=["nonfinite=ignore"],
        expect=["nonfinite must be 'stop' or 'skip', got 'ignore'"],
    ),
    Case(
        "bogus_quantization",
        overrides=["reference.quantization=int4"],
        expect=["reference.quantization must be", "got 'int4'"],
    ),
    Case(
        "fp8_dynamic_on_cpu",
        overrides=["reference.quantization=fp8_dynamic"],
        expect=["fp8_dynamic needs a CUDA GPU"],
    ),
    Case(
        "cuda_without_cuda",
        overrides=["device=cuda"],
        expect=["device is 'cuda' but no CUDA device is available"],
    ),
    # -- checkpoints
    Case(
        "ref_checkpoint_other_shape",
        setup=_mismatched_ref,
        expect=["ref32", "has shape (704, 32), the model expects (704, 64)"],
    ),
    Case("truncated_base_safetensors", setup=_truncated_base, expect=["model.safetensors"]),
    # -- data rows
    Case(
        "missing_field",
        setup=_data(_rows_with(2, rejected=_DROP)),
        expect=["dataset.jsonl row 2 (line 3): field 'rejected' is missing"],
    ),
    Case(
        "empty_completion",
        setup=_data(_rows_with(1, chosen="  ")),
        expect=["dataset.jsonl row 1 (line 2): field 'chosen' is empty"],
    ),
    Case(
        "non_string_completion",
        setup=_data(_rows_with(3, rejected=5)),
        expect=[
            "dataset.jsonl row 3 (line 4): field 'rejected' must be a non-empty string or a list of messages, got int"
        ],
    ),
    Case(
        "all_rows_too_long",
        overrides=["tokenizer.max_seq_len=8"],
        expect=["train.jsonl: all 8 rows are longer than max_seq_len=8 tokens"],
    ),
    Case(
        "kto_one_class",
        loss="kto",
        setup=_data(lambda: _kto_rows(8, [True] * 8), KTO_DS),
        expect=[
            "dataset.jsonl: KTO needs both desirable and undesirable rows, got 8 desirable and 0 undesirable"
        ],
    ),
    Case(
        "kto_batch_size_1",
        loss="kto",
        overrides=["batch_size=1"],
        expect=["batch_size: KTOLoss", "needs batch_size >= 2 per rank, got 1"],
    ),
    Case(
        "kto_paired_data",
        loss="kto",
        edits={"dataset._component_": "torchtune_prefopt.data.preference_dataset"},
        expect=["dataset: KTO trains on unpaired rows", "unpaired_from_paired"],
    ),
    Case(
        "eval_dataset_unpaired",
        setup=_data(lambda: _kto_rows(8), KTO_DS, key="eval_dataset"),
        expect=["eval_dataset: this loss (or evaluation) needs paired chosen/rejected rows"],
    ),
    # -- resume
    Case(
        "resume_other_global_batch",
        setup=_resume_other_batch,
        preexisting_checkpoint=True,
        expect=[
            "resume: the checkpoint was trained with a global micro-batch of 8",
            "this run has 4",
        ],
    ),
    Case(
        "resume_truncated_checkpoint",
        setup=_resume_truncated,
        preexisting_checkpoint=True,
        expect=["step_000002/model.safetensors is truncated or damaged", "manifest says"],
    ),
    Case(
        "resume_corrupt_header",
        setup=_resume_corrupt_header,
        preexisting_checkpoint=True,
        expect=["step_000002/model.safetensors is damaged"],
    ),
    Case(
        "resume_pickled_object",
        setup=_resume_pickle,
        preexisting_checkpoint=True,
        expect=[
            "step_000002/recipe_state.pt cannot be loaded",
            "refuses to unpickle (GLOBAL posix.mkdir)",
            "do not load it with weights_only=False",
        ],
    ),
    # -- warnings, not errors: the run trains
    Case(
        "chosen_equals_rejected",
        setup=_data(_rows_with(5, rejected=_good_rows(8)[5]["chosen"])),
        warn=[
            "dropped 1 row(s) whose chosen and rejected completions are identical",
            "'dropped_identical': 1",
        ],
    ),
    Case(
        "simpo_with_ref_checkpointer",
        loss="simpo",
        setup=_simpo_with_ref,
        warn=[
            "SimPOLoss is reference-free: ref_checkpointer/reference.* are ignored and no reference model is loaded"
        ],
    ),
]


# ----------------------------------------------------------------------------- running
@dataclass
class Result:
    case_dir: Path
    returncode: int
    stdout: str
    stderr: str
    before: List[str]  # files under out/ before the run


def _snapshot(out: Path) -> List[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []


def _prepare(case: Case, case_dir: Path, base: Path) -> List[str]:
    case_dir.mkdir(parents=True)
    shutil.copytree(base, case_dir / "base")
    edits = dict(case.edits)
    if case.setup is not None:
        edits.update(case.setup(case_dir, base))
    cfg = _write_config(case_dir, case.loss, edits)
    return ["run", "prefopt_distributed", "--config", str(cfg), *case.overrides]


def _launch(cmd: List[str], case_dir: Path) -> Result:
    before = _snapshot(case_dir / "out")
    proc = tune(cmd, case_dir)
    return Result(case_dir, proc.returncode, proc.stdout, proc.stderr, before)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    from torchtune_prefopt.models.tiny import make_tiny_hf_checkpoint

    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_base") / "base")


@pytest.fixture(scope="module")
def results(request, tmp_path_factory, base_checkpoint) -> Dict[str, Result]:
    """Run every *selected* case of test_bad_input (JOBS at a time); id -> Result."""
    selected = {
        item.callspec.params["case"].id
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_bad_input" and hasattr(item, "callspec")
    }
    root = tmp_path_factory.mktemp("bad_input")
    jobs = {}
    for case in CASES:
        if case.id in selected:
            case_dir = root / case.id
            jobs[case.id] = (_prepare(case, case_dir, base_checkpoint), case_dir)
    with ThreadPoolExecutor(max_workers=JOBS) as pool:
        futures = {cid: pool.submit(_launch, cmd, d) for cid, (cmd, d) in jobs.items()}
        done = {cid: f.result() for cid, f in futures.items()}
    dump = os.environ.get("PREFOPT_TEST_DUMP_ERRORS")  # regenerate docs/troubleshooting.md's table
    if dump:
        lines = {
            cid: [
                x
                for x in (r.stdout + r.stderr).splitlines()
                if x.startswith("error: ") or "WARNING" in x or "Warning:" in x
            ]
            for cid, r in done.items()
        }
        Path(dump).write_text(json.dumps(lines, indent=1))
    return done


def _describe(r: Result) -> str:
    return f"exit {r.returncode}\n--- stderr (tail) ---\n{r.stderr[-4000:]}\n--- stdout (tail) ---\n{r.stdout[-1500:]}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, results: Dict[str, Result]):
    r = results[case.id]
    out = r.case_dir / "out"
    output = r.stdout + r.stderr
    assert "Traceback" not in output, _describe(r)
    if case.warn is not None:
        assert r.returncode == 0, _describe(r)
        for text in case.warn:
            assert text in output, f"{text!r} not in the output\n{_describe(r)}"
        return

    assert r.returncode == 2, _describe(r)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, _describe(r)
    for text in case.expect:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    # Nothing written: no logs, no config dump, no new checkpoint (or .tmp- leftover).
    assert not (out / "logs").exists(), _snapshot(out)
    assert not (out / "torchtune_config.yaml").exists(), _snapshot(out)
    if case.preexisting_checkpoint:
        assert _snapshot(out) == r.before, (r.before, _snapshot(out))
    else:
        assert not (out / "checkpoints").exists(), _snapshot(out)


def test_pickled_recipe_state_is_not_executed(results: Dict[str, Result]):
    """weights_only=True: the object's __reduce__ (os.mkdir) never ran."""
    if "resume_pickled_object" not in results:
        pytest.skip("test_bad_input[resume_pickled_object] not selected")
    r = results["resume_pickled_object"]
    assert not (r.case_dir / "PWNED").exists()
