"""Export: a tiny run's final checkpoint (full, and LoRA merged) is a working Hugging Face model;
the metric names in the DiskLogger log are the recipe's; TensorBoard logging works.

The runs are in-process (the recipe class driven directly, 2 optimizer steps on CPU) so the
names the recipe hands to its metric logger can be recorded and the trained torchtune model
compared with the exported one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torchtune_prefopt
from torchtune_prefopt import _config
from torchtune_prefopt.compare import TRAIN_CURVE_METRICS, parse_disk_log
from tune_harness import recipe_in_process

SYNTHETIC_HELDOUT = (
    Path(torchtune_prefopt.__file__).parent / "data" / "assets" / "synthetic" / "heldout.jsonl"
)

PAIRED_TRAIN = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "lr",
    "grad_norm",
    "tokens_per_second",
    "peak_memory_gib",
}
EVAL = {
    "eval/rewards/accuracies",
    "eval/rewards/margins",
    "eval/rewards/chosen",
    "eval/rewards/rejected",
    "eval/logps/chosen",
    "eval/logps/rejected",
    "eval/logps/accuracies",
    "eval/rows",
    "eval/reference/accuracies",
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    heldout = root / "heldout8.jsonl"
    heldout.write_text("".join(SYNTHETIC_HELDOUT.read_text().splitlines(keepends=True)[:8]))
    return {"root": root, "base": root / "base", "heldout": heldout}


def train_in_process(shared, name: str, config: str, extra=()):
    """Run the recipe in this process; returns (output_dir, names logged, log file, probe, logits)."""
    out = shared["root"] / name
    cfg = _config.load_config(
        [
            "--config",
            config,
            f"output_dir={out}",
            f"checkpointer.checkpoint_dir={shared['base']}",
            "max_steps_per_epoch=2",
            "batch_size=4",
            "eval_every_n_steps=null",
            "eval_dataset._component_=torchtune_prefopt.data.preference_dataset",
            "eval_dataset.source=json",
            f"eval_dataset.data_files.heldout={shared['heldout']}",
            *extra,
        ]
    )
    names: set = set()
    with recipe_in_process(cfg) as recipe:
        logger = recipe._metric_logger
        original = logger.log_dict

        def recording(payload, step):
            names.update(payload)
            return original(payload, step)

        logger.log_dict = recording
        log_file = logger.path_to_log_file() if hasattr(logger, "path_to_log_file") else None
        recipe.train()
        # the trained torchtune model's logits on a held-out sequence, for the export check
        probe = torch.tensor([recipe._eval_dataset[0]["chosen_input_ids"]])
        with torch.no_grad():
            logits = recipe._model(probe).float()
    return out, names, log_file, probe, logits


def _hf_check(final: Path, probe: torch.Tensor, logits: torch.Tensor):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        hf_logits = model(probe).logits.float()
        gen = model.generate(probe, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert hf_logits.shape == logits.shape
    torch.testing.assert_close(hf_logits, logits, atol=2e-4, rtol=1e-4)
    assert gen.shape[1] > probe.shape[1] and torch.equal(gen[:, : probe.shape[1]], probe)


def test_full_checkpoint_loads_in_transformers_and_metric_names(shared):
    out, names, log_file, probe, logits = train_in_process(shared, "full_dpo", "tiny/dpo")
    final = (out / "final").resolve()
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()
    _hf_check(final, probe, logits)
    # HF tools get the tokenizer the model was trained with: ChatML's end of turn is the EOS
    from transformers import AutoTokenizer

    from torchtune_prefopt.models.tiny import tiny_special_tokens

    tok = AutoTokenizer.from_pretrained(str(final))
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", tiny_special_tokens()["<|im_end|>"])
    assert tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    # the DiskLogger file holds exactly the names the recipe logged
    logged = parse_disk_log(log_file)
    assert set(logged) == names
    assert names == PAIRED_TRAIN | EVAL
    assert {
        m
        for m in TRAIN_CURVE_METRICS
        if not m.startswith(("rewards/d", "rewards/u", "logps/d", "logps/u", "kl"))
    } <= names
    assert [s for s, _ in logged["loss"]] == [1, 2] and [
        s for s, _ in logged["eval/rewards/accuracies"]
    ] == [0, 2]


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_lora_merged_checkpoint_loads_in_transformers(shared, variant):
    """LoRA and DoRA (``use_dora``: the magnitudes start at the base weights' row norms)."""
    lora = [
        "model._component_=torchtune_prefopt.models.tiny.lora_tiny_qwen2",
        "model.lora_attn_modules=[q_proj,k_proj,v_proj,output_proj]",
        "model.apply_lora_to_mlp=true",
        "model.lora_rank=8",
        "model.lora_alpha=16",
        "optimizer.lr=0.01",
        *(["model.use_dora=true"] if variant == "dora" else []),
    ]
    out, names, log_file, probe, logits = train_in_process(
        shared, f"{variant}_dpo", "tiny/dpo", lora
    )
    final = (out / "final").resolve()
    # merged weights in the model files; the adapter alone next to them
    assert (final / "adapter_model.safetensors").is_file() or (final / "adapter_model.pt").is_file()
    # HF's logits from the merged weights == the trained LoRA model's (adapters active)
    _hf_check(final, probe, logits)
    assert set(parse_disk_log(log_file)) == names == PAIRED_TRAIN | EVAL


def test_kto_metric_names(shared):
    kto = [
        "loss._component_=torchtune_prefopt.losses.KTOLoss",
        "dataset._component_=torchtune_prefopt.data.synthetic_kto_dataset",
    ]
    out, names, log_file, _, _ = train_in_process(shared, "kto", "tiny/dpo", kto)
    assert set(parse_disk_log(log_file)) == names
    kto = {
        "loss",
        "kl",
        "rewards/desirable",
        "rewards/undesirable",
        "logps/desirable",
        "logps/undesirable",
        "lr",
        "grad_norm",
        "tokens_per_second",
        "peak_memory_gib",
    }
    assert names == kto | EVAL
    assert {
        m
        for m in TRAIN_CURVE_METRICS
        if m.startswith(("rewards/d", "rewards/u", "logps/d", "logps/u", "kl"))
    } <= names


def test_tensorboard_logger(shared):
    import tensorboard  # noqa: F401  (the `test` extra installs it)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dir = shared["root"] / "tb"
    out, names, _, _, _ = train_in_process(
        shared,
        "tb_dpo",
        "tiny/dpo",
        [
            "metric_logger._component_=torchtune.training.metric_logging.TensorBoardLogger",
            f"metric_logger.log_dir={tb_dir}",
        ],
    )
    events = list(tb_dir.rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for e in events:
        acc = EventAccumulator(str(e.parent))
        acc.Reload()
        # torch's SummaryWriter without TensorFlow stores scalars as "tensors" summaries
        tags |= set(acc.Tags().get("scalars", [])) | set(acc.Tags().get("tensors", []))
    assert tags == names


def test_export_names_its_dtype_and_gets_the_users_umask(shared):
    """A bf16 run from an fp32 checkpoint exports bf16 weights under a config.json that says
    bfloat16 (from_pretrained loads the config's dtype), and every exported file has the
    user's umask (torchtune writes its weight file 0600)."""
    import json
    import os

    from safetensors import safe_open

    out, _, _, _, _ = train_in_process(
        shared, "bf16", "tiny/dpo", extra=("dtype=bf16", "max_steps_per_epoch=1")
    )
    final = (out / "final").resolve()
    base_config = json.loads((shared["base"] / "config.json").read_text())
    assert base_config.get("dtype", "float32") == "float32"  # none said: float32
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    weights = sorted(final.glob("model*.safetensors"))
    with safe_open(str(weights[0]), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in final.iterdir() if p.is_file()}
    assert set(modes.values()) == {0o666 & ~mask}, modes
