"""TRL's ``DPOTrainer`` on the packing benchmark's rows, timed like our recipe.

Run by ``benchmarks/bench_packing.py`` as ``python _trl_dpo.py <config.json>`` in an environment
where ``trl`` (1.16) and ``accelerate`` are importable (the benchmark installs them into a
directory of their own and puts it on ``PYTHONPATH`` for this process only).

TRL with its defaults except where a fair comparison needs otherwise: ``gradient_checkpointing``
off (TRL's default is on; ours and torchtune's runs have none), ``max_length=None`` (TRL's default
1024 would truncate the longer rows that the others compute), learning rate / batch / steps as
the other recipes, no logging backends, no saving. The model is ``AutoModelForCausalLM`` (Llama, or the MoE of ``--model qwen3_moe``) loaded
from the same random-weight checkpoint the other recipes load; TRL builds its own reference copy.

Two shims, both about the input rather than the computation:

* the rows are token ids already (``_bench_components.workload_pairs``), so TRL's text
  preparation is skipped and its tokenized columns (``prompt_ids``, ``chosen_ids``,
  ``rejected_ids``: what its ``tokenize_fn`` outputs) are handed in directly;
* the sampler is sequential, so step ``k`` trains on the same 8 pairs as the other recipes
  (run with ``shuffle: false``) and per-step token counts are comparable.

Steps are stamped by a ``TrainerCallback`` into the same JSONL clock file format as
``_bench_components.StepClockLogger`` (``t``, ``cpu``, ``rss``, ``hwm``, ``cuda_peak``), and after
``hold_after_step`` it writes ``{"hold": true}`` and sleeps so the harness reads the peak RSS.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _bench_components import peer_clock, peer_rows  # noqa: E402


def _tokenizer():
    """A minimal fast tokenizer: TRL only needs its pad / eos ids here (rows are token ids)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 2, "<unk>": 3}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = peer_rows(cfg)
    cols = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for i in range(len(rows)):
        it = rows[i]
        n = it["chosen_labels"].count(-100)
        cols["prompt_ids"].append(it["chosen_input_ids"][:n])
        cols["chosen_ids"].append(it["chosen_input_ids"][n:])
        cols["rejected_ids"].append(it["rejected_input_ids"][n:])
    dataset = Dataset.from_dict(cols)

    # rank 0's clock (under torchrun, every worker runs this script; accelerate gives each its
    # part of the global batch)
    clock = peer_clock(cfg) if int(os.environ.get("RANK", "0")) == 0 else None

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            # the loss is not known here (TRL logs it later): the clock needs only the time
            if clock is not None:
                clock.log_dict({"loss": float("nan")}, int(state.global_step))

    DPOTrainer._prepare_dataset = lambda self, dataset, *a, **k: dataset  # token ids already
    DPOTrainer._get_train_sampler = lambda self, *a, **k: SequentialSampler(self.train_dataset)

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(cfg["checkpoint_dir"], dtype=dtype)
    args = DPOConfig(
        output_dir=cfg["output_dir"],
        per_device_train_batch_size=cfg["batch"],
        learning_rate=1e-6,
        max_steps=cfg["steps"],
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        gradient_checkpointing=False,
        max_length=None,
        use_cpu=cfg["device"] == "cpu",
        bf16=cfg["dtype"] == "bf16",
        dataloader_num_workers=0,
        seed=0,
        remove_unused_columns=False,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=_tokenizer(),
        callbacks=[StepClock()],
    )
    trainer.train()


if __name__ == "__main__":
    main()
