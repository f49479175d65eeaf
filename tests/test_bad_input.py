"""Every user mistake is one line before any compute, and nothing is written.

The table below is docs/troubleshooting.md's table, by class: the config file (YAML,
interpolations), components (import, keyword arguments), values, paths (tokenizer,
checkpoints, output_dir), LoRA settings, data rows (fields, encoding, length against the
model's context), checkpoints and resume. Every case runs the recipe's ``run(cfg)`` in this
process (what ``tune run`` runs after parsing its command line: `tune_harness.run_in_process`)
and checks:

* errors: a :class:`PrefOptUserError` whose message is one line and names the key / file /
  row; nothing was written (no ``output_dir`` if there was none before, no logs, no config
  dump, no new checkpoint);
* warnings (identical chosen/rejected rows, SimPO with a ``ref_checkpointer``, ...): the run
  trains its one step, and the warning is printed.

``CLI_CASES`` also run through the real CLI (one process, and torchrun with 2 processes) to
prove what a user sees: exit status 2, exactly one ``error:`` line, no traceback from the
recipe or from torchrun's agent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from torchtune_prefopt._config import load_config
from torchtune_prefopt.errors import PrefOptUserError
from tune_harness import (
    JOBS,
    run_in_process,
    run_recipe,
    synthetic_rows,
    tiny_config,
    write_jsonl,
)

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
    raw_config: Optional[str] = None  # the config file's text instead of the tiny YAML


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


def _tokenizer_paths(case_dir: Path, base: Path) -> Dict[str, object]:
    missing = case_dir / "Llama-3.2-1B-Instruct" / "original" / "tokenizer.model"
    return {
        "tokenizer": {
            "_component_": "torchtune.models.llama3.llama3_tokenizer",
            "path": str(missing),
        }
    }


def _hf_checkpointer(
    case_dir: Path, files: List[str], key: str = "checkpointer", where: str = "weights"
) -> Dict[str, object]:
    return {
        key: {
            "_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": str(case_dir / where),
            "checkpoint_files": files,
            "model_type": "QWEN2",
            "output_dir": "${output_dir}",
        }
    }


def _missing_checkpoint_dir(case_dir: Path, base: Path) -> Dict[str, object]:
    return _hf_checkpointer(case_dir, ["model.safetensors"])


def _missing_checkpoint_file(case_dir: Path, base: Path) -> Dict[str, object]:
    (case_dir / "weights").mkdir()
    return _hf_checkpointer(case_dir, ["model-00001-of-00002.safetensors"])


def _missing_ref_checkpoint(case_dir: Path, base: Path) -> Dict[str, object]:
    return _hf_checkpointer(
        case_dir, ["model.safetensors"], key="ref_checkpointer", where="ref_weights"
    )


def _output_dir_is_file(case_dir: Path, base: Path) -> Dict[str, object]:
    (case_dir / "out").write_text("not a directory")
    return {}


def _output_dir_under_file(case_dir: Path, base: Path) -> Dict[str, object]:
    (case_dir / "plain_file").write_text("x")
    return {"output_dir": str(case_dir / "plain_file" / "out")}


def _invalid_utf8(case_dir: Path, base: Path) -> Dict[str, object]:
    lines = [json.dumps(r).encode() for r in _good_rows(8)]
    lines[2] = lines[2][:20] + b"\xff" + lines[2][20:]  # a Latin-1 byte inside row 2's prompt
    f = case_dir / "latin1.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    return {
        "dataset": {
            "_component_": "torchtune_prefopt.data.preference_dataset",
            "source": "json",
            "data_files": str(f),
        }
    }


def _long_row(case_dir: Path, base: Path) -> Dict[str, object]:
    rows = _good_rows(8)
    rows[3]["prompt"] = " ".join(["The quick brown fox jumps over the lazy dog."] * 80)
    f = _jsonl(case_dir / "long.jsonl", rows)
    return {
        "dataset": {
            "_component_": "torchtune_prefopt.data.preference_dataset",
            "source": "json",
            "data_files": str(f),
        },
        "tokenizer.max_seq_len": None,
    }


def _lora(**extra) -> Dict[str, object]:
    return {
        "model": {
            "_component_": "torchtune_prefopt.models.tiny.lora_tiny_qwen2",
            "lora_attn_modules": ["q_proj", "v_proj"],
            "lora_rank": 4,
            "lora_alpha": 8,
            **extra,
        }
    }


KTO_DS = "torchtune_prefopt.data.kto_dataset"
YAML_SYNTAX = "output_dir: /tmp/x\nmodel:\n  _component_: [unclosed\n"
YAML_LIST = "- output_dir: /tmp/x\n- model: m\n"
WANDB = "torchtune.training.metric_logging.WandBLogger"

# fmt: off
CASES = [
    # -- the config file itself
    Case("yaml_syntax", raw_config=YAML_SYNTAX, expect=["is not valid YAML", "line 3"]),
    Case("yaml_not_a_mapping", raw_config=YAML_LIST, expect=["the top level must be a mapping", "got a list"]),
    Case("bad_interpolation", overrides=["output_dir=${nonexistent}/x"], expect=["config key 'output_dir'", "nonexistent"]),
    Case("bad_override_form", overrides=["batch_size"], expect=["key=value", "batch_size"]),
    # -- components: import and keyword arguments
    Case("model_component_import", overrides=["model._component_=torchtune_prefopt.models.tiny.tiny_qwen3"], expect=["model._component_: cannot import 'torchtune_prefopt.models.tiny.tiny_qwen3'"]),
    Case("model_unknown_kwarg", overrides=["model.lora_rank=4"], expect=["model.lora_rank:", "does not accept 'lora_rank'"]),
    Case("optimizer_component_import", overrides=["optimizer._component_=torch.optim.AdamWW"], expect=["optimizer._component_: cannot import 'torch.optim.AdamWW'"]),
    Case("optimizer_unknown_kwarg", overrides=["optimizer.lrr=0.1"], expect=["optimizer.lrr:", "did you mean 'lr'"]),
    Case("lr_scheduler_unknown_kwarg", overrides=["lr_scheduler.warmup_steps=3"], expect=["lr_scheduler.warmup_steps:", "did you mean 'num_warmup_steps'"]),
    Case("lr_scheduler_missing_arg", edits={"lr_scheduler": {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup"}}, expect=["lr_scheduler:", "needs 'num_warmup_steps'"]),
    Case("metric_logger_component_import", overrides=["metric_logger._component_=torchtune.training.metric_logging.DiskLoger"], expect=["metric_logger._component_: cannot import"]),
    Case("metric_logger_not_installed", edits={"metric_logger": {"_component_": WANDB, "project": "p"}}, expect=["metric_logger:", "needs the 'wandb' package", "pip install wandb"]),
    Case("dataset_component_import", overrides=["dataset._component_=torchtune_prefopt.data.preference_datasett"], expect=["dataset._component_: cannot import"]),
    Case("dataset_unknown_kwarg", overrides=["dataset.sourc=json"], expect=["train.jsonl", "unexpected keyword argument 'sourc'"]),
    Case("optimizer_unknown_kwarg_component", overrides=["optimizer._component_=torch.optim.SGD", "optimizer.betas=[0.9,0.99]"], expect=["optimizer.betas:", "torch.optim.SGD does not accept 'betas'"]),
    # -- values
    Case("optimizer_lr_zero", overrides=["optimizer.lr=0"], expect=["optimizer.lr must be a finite number > 0, got 0"]),
    Case("optimizer_lr_negative", overrides=["optimizer.lr=-0.001"], expect=["optimizer.lr must be a finite number > 0"]),
    Case("optimizer_lr_nan", overrides=["optimizer.lr=.nan"], expect=["optimizer.lr must be a finite number > 0, got nan"]),
    Case("optimizer_lr_inf", overrides=["optimizer.lr=.inf"], expect=["optimizer.lr must be a finite number > 0, got inf"]),
    Case("optimizer_lr_string", overrides=["optimizer.lr=fast"], expect=["optimizer.lr must be a finite number > 0, got 'fast'"]),
    Case("negative_weight_decay", overrides=["optimizer.weight_decay=-0.1"], expect=["optimizer.weight_decay must be a finite number >= 0"]),
    Case("negative_seed", overrides=["seed=-1"], expect=["seed must be an integer >= 0", "got -1"]),
    Case("reference_not_a_mapping", overrides=["reference=int8"], expect=["reference must be a mapping", "got 'int8'"]),
    Case("resume_flag_not_bool", overrides=["resume_from_checkpoint=yes please"], expect=["resume_from_checkpoint must be true or false"]),
    Case("packed_not_bool", overrides=["packed=sometimes"], expect=["packed must be true or false, got 'sometimes'"]),
    Case("share_prompt_without_packed", overrides=["share_prompt=true"], expect=["share_prompt: true needs packed: true", "set packed=true"]),
    # -- files and directories
    Case("tokenizer_file_missing", setup=_tokenizer_paths, expect=["tokenizer.path:", "tokenizer.model does not exist", "tune download"]),
    Case("checkpoint_dir_missing", setup=_missing_checkpoint_dir, expect=["checkpointer.checkpoint_dir:", "is not a directory", "tune download"]),
    Case("checkpoint_file_missing", setup=_missing_checkpoint_file, expect=["checkpointer.checkpoint_files:", "model-00001-of-00002.safetensors does not exist"]),
    Case("ref_checkpoint_dir_missing", setup=_missing_ref_checkpoint, expect=["ref_checkpointer.checkpoint_dir:", "ref_weights is not a directory"]),
    Case("output_dir_is_a_file", setup=_output_dir_is_file, preexisting_checkpoint=True, expect=["output_dir:", "exists and is not a directory"]),
    Case("output_dir_under_a_file", setup=_output_dir_under_file, expect=["output_dir:", "cannot be created", "plain_file is not a directory"]),
    Case("output_dir_not_writable", overrides=["output_dir=/proc/prefopt_cannot_write_here"], expect=["output_dir: /proc/prefopt_cannot_write_here cannot be created in /proc ("]),
    # -- LoRA
    Case("lora_unknown_module", setup=lambda d, b: _lora(lora_attn_modules=["q_proj", "qv_proj"]), expect=["model.lora_attn_modules: unknown module 'qv_proj'"]),
    Case("lora_rank_zero", setup=lambda d, b: _lora(lora_rank=0), expect=["model.lora_rank must be an integer >= 1, got 0"]),
    Case("lora_alpha_negative", setup=lambda d, b: _lora(lora_alpha=-8), expect=["model.lora_alpha must be a number > 0, got -8"]),
    Case("lora_with_ref_checkpointer", setup=lambda d, b: {**_lora(), **_mismatched_ref(d, b)}, warn=["ref_checkpointer is ignored with a LoRA model"]),
    # -- data against the model
    Case("row_longer_than_context", setup=_long_row, expect=["dataset: row 3 has", "more than the model's context of 512 tokens", "max_seq_len"]),
    Case("invalid_utf8", setup=_invalid_utf8, expect=["latin1.jsonl line 3: not valid UTF-8", "byte 0xff"]),
    # -- config keys and hyper-parameters
    Case("unknown_loss", overrides=["loss._component_=dpoo"], expect=["loss: unknown loss 'dpoo'", "valid:", "dpo", "kto", "simpo"]),
    Case("beta_zero", overrides=["loss.beta=0"], expect=["loss.beta must be > 0, got 0"]),
    Case("label_smoothing_0.5", overrides=["loss.label_smoothing=0.5"], expect=["loss.label_smoothing must be in [0, 0.5), got 0.5"]),
    Case("simpo_gamma_negative", loss="simpo", overrides=["loss.gamma=-1"], expect=["loss.gamma must be >= 0"]),
    Case("ipo_tau_zero", loss="ipo", overrides=["loss.tau=0"], expect=["loss.tau must be > 0"]),
    Case("unknown_key_typo", overrides=["batch_sise=4"], expect=["unknown config key 'batch_sise'", "did you mean 'batch_size'"]),
    Case("batch_size_zero", overrides=["batch_size=0"], expect=["batch_size must be an integer >= 1, got 0"]),
    Case("bad_dtype", overrides=["dtype=fp16"], expect=["dtype must be 'fp32' or 'bf16', got 'fp16'"]),
    Case("bad_nonfinite", overrides=["nonfinite=ignore"], expect=["nonfinite must be 'stop' or 'skip', got 'ignore'"]),
    Case("bogus_quantization", overrides=["reference.quantization=int4"], expect=["reference.quantization must be", "got 'int4'"]),
    Case("fp8_dynamic_on_cpu", overrides=["reference.quantization=fp8_dynamic"], expect=["fp8_dynamic needs a CUDA GPU"]),
    Case("cuda_without_cuda", overrides=["device=cuda"], expect=["device is 'cuda' but no CUDA device is available (set device=cpu)"]),
    Case("cuda_bf16_without_cuda", overrides=["device=cuda", "dtype=bf16"], expect=["no CUDA device is available (set device=cpu dtype=fp32; bf16 on a CPU runs 17-30x slower than fp32)"]),
    # -- checkpoints
    Case("ref_checkpoint_other_shape", setup=_mismatched_ref, expect=["ref32", "weight 'lm_head.weight' has shape (704, 32), the model built from the config expects (704, 64)"]),
    Case("truncated_base_safetensors", setup=_truncated_base, expect=["model.safetensors"]),
    # -- data rows
    Case("missing_field", setup=_data(_rows_with(2, rejected=_DROP)), expect=["dataset.jsonl row 2 (line 3): field 'rejected' is missing"]),
    Case("empty_completion", setup=_data(_rows_with(1, chosen="  ")), expect=["dataset.jsonl row 1 (line 2): field 'chosen' is empty"]),
    Case("non_string_completion", setup=_data(_rows_with(3, rejected=5)), expect=["dataset.jsonl row 3 (line 4): field 'rejected' must be a non-empty string or a list of messages, got int"]),
    Case("all_rows_too_long", overrides=["tokenizer.max_seq_len=8"], expect=["train.jsonl: all 8 rows are longer than max_seq_len=8 tokens"]),
    Case("kto_one_class", loss="kto", setup=_data(lambda: _kto_rows(8, [True] * 8), KTO_DS), expect=["dataset.jsonl: KTO needs both desirable and undesirable rows, got 8 desirable and 0 undesirable"]),
    Case("kto_batch_size_1", loss="kto", overrides=["batch_size=1"], expect=["batch_size: KTOLoss", "needs batch_size x processes >= 2, got 1 x 1"]),
    Case("kto_paired_data", loss="kto", edits={"dataset._component_": "torchtune_prefopt.data.preference_dataset"}, expect=["dataset: KTO trains on unpaired rows", "unpaired_from_paired"]),
    Case("eval_dataset_unpaired", setup=_data(lambda: _kto_rows(8), KTO_DS, key="eval_dataset"), expect=["eval_dataset: this loss (or evaluation) needs paired chosen/rejected rows"]),
    # -- resume
    Case("resume_other_global_batch", setup=_resume_other_batch, preexisting_checkpoint=True, expect=["resume: the checkpoint was trained with a global micro-batch of 8", "this run has 4"]),
    Case("resume_truncated_checkpoint", setup=_resume_truncated, preexisting_checkpoint=True, expect=["step_000002/model.safetensors is truncated or damaged", "manifest says"]),
    Case("resume_corrupt_header", setup=_resume_corrupt_header, preexisting_checkpoint=True, expect=["step_000002/model.safetensors is damaged"]),
    Case("resume_pickled_object", setup=_resume_pickle, preexisting_checkpoint=True, expect=["step_000002/recipe_state.pt cannot be loaded", "refuses to unpickle (GLOBAL posix.mkdir)", "do not load it with weights_only=False"]),
    # -- warnings, not errors: the run trains
    Case("chosen_equals_rejected", setup=_data(_rows_with(5, rejected=_good_rows(8)[5]["chosen"])), warn=["dropped 1 row(s) whose chosen and rejected completions are identical", "'dropped_identical': 1"]),
    Case("simpo_with_ref_checkpointer", loss="simpo", setup=_simpo_with_ref, warn=["SimPOLoss is reference-free: ref_checkpointer ignored and no reference model is loaded"]),
    Case("simpo_with_precompute", loss="simpo", overrides=["reference.precompute=true"], warn=["SimPOLoss is reference-free: reference.precompute ignored"]),
]
# fmt: on


# ----------------------------------------------------------------------------- running
def _snapshot(out: Path) -> List[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.is_dir() else []


def _prepare(case: Case, case_dir: Path, base: Path) -> Path:
    case_dir.mkdir(parents=True)
    shutil.copytree(base, case_dir / "base")
    if case.raw_config is not None:
        path = case_dir / "config.yaml"
        path.write_text(case.raw_config)
        return path
    edits = dict(case.edits)
    if case.setup is not None:
        edits.update(case.setup(case_dir, base))
    return _write_config(case_dir, case.loss, edits)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    from torchtune_prefopt.models.tiny import make_tiny_hf_checkpoint

    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_base") / "base")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_user_mistake(case: Case, tmp_path: Path, base_checkpoint: Path, capfd, caplog, recwarn):
    case_dir = tmp_path / case.id
    config = _prepare(case, case_dir, base_checkpoint)
    out = case_dir / "out"
    before, existed = _snapshot(out), out.exists()
    try:
        run_in_process(load_config(["--config", str(config), *case.overrides]))
        error = None
    except (PrefOptUserError, ValueError) as err:  # ValueError: torchtune's override parsing
        error = str(err)
    # what a user would see: printed text, log records, Python warnings
    output = "".join(capfd.readouterr()) + caplog.text + "".join(str(w.message) for w in recwarn)
    dump = os.environ.get("PREFOPT_TEST_DUMP_ERRORS")  # regenerate the README's table
    if dump:
        with open(dump, "a") as fh:
            fh.write(
                json.dumps(
                    {
                        "id": case.id,
                        "error": error,
                        "warn": case.warn
                        and [ln for ln in output.splitlines() if any(w in ln for w in case.warn)],
                    }
                )
                + "\n"
            )
    if case.warn is not None:
        assert error is None, error
        for text in case.warn:
            assert text in output, f"{text!r} not in the output:\n{output[-3000:]}"
        return
    assert error is not None, f"no error raised\n{output[-3000:]}"
    assert "\n" not in error, error
    for text in case.expect:
        assert text in error, f"{text!r} not in {error!r}"
    # nothing written, not even an empty output_dir
    if case.preexisting_checkpoint:
        assert _snapshot(out) == before and out.exists() == existed
    else:
        assert not out.exists(), _snapshot(out)
    if case.id == "resume_pickled_object":  # weights_only=True: __reduce__ (os.mkdir) never ran
        assert not (case_dir / "PWNED").exists()


# ----------------------------------------------------------------------------- the real CLI
#: (case, nproc): the one-line error, exit 2 and no traceback through `tune run`, also under
#: torchrun, whose agent would otherwise print its own traceback and exit 1
CLI_CASES = [
    ("unknown_loss", 1), ("missing_field", 1), ("yaml_syntax", 1), ("resume_truncated_checkpoint", 1),
    ("simpo_with_ref_checkpointer", 1), ("unknown_key_typo", 2), ("missing_field", 2),
]  # fmt: skip
_BY_ID = {c.id: c for c in CASES}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, base_checkpoint):
    root = tmp_path_factory.mktemp("cli")

    def launch(case_id: str, nproc: int):
        case = _BY_ID[case_id]
        case_dir = root / f"{case_id}-{nproc}p"
        config = _prepare(case, case_dir, base_checkpoint)
        before = _snapshot(case_dir / "out")
        return run_recipe(config, *case.overrides, cwd=case_dir, nproc=nproc), case_dir, before

    with ThreadPoolExecutor(max_workers=JOBS) as pool:
        futures = {key: pool.submit(launch, *key) for key in CLI_CASES}
        return {key: f.result() for key, f in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("key", CLI_CASES, ids=[f"{c}-{n}p" for c, n in CLI_CASES])
def test_cli_exit_code_and_one_line(key, cli_results):
    proc, case_dir, before = cli_results[key]
    case = _BY_ID[key[0]]
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text[-4000:]
    if case.warn is not None:
        assert proc.returncode == 0, text[-4000:]
        assert all(w in text for w in case.warn)
        return
    assert proc.returncode == 2, text[-4000:]
    errors = [ln for ln in proc.stderr.splitlines() if re.match(r"^(\S+: )?error: ", ln)]
    assert len(errors) == 1, proc.stderr  # rank 0 only, nothing from torchrun's agent
    assert all(t in errors[0] for t in case.expect), (errors[0], case.expect)
    assert "ChildFailedError" not in text and "exitcode" not in text
    if not case.preexisting_checkpoint:
        assert not (case_dir / "out").exists()
    else:
        assert _snapshot(case_dir / "out") == before
