"""TRL 1.16 on the token ids our recipe trains on: the reference the TRL equality tests compare
the recipe's steps against.

:func:`run_trl` trains TRL's own ``DPOTrainer`` (or its experimental ``ORPOTrainer``) from an HF
checkpoint on the rows of one of our tokenized datasets and returns TRL's per-step logs and final
weights. Everything that would make TRL's step differ from ours for reasons other than the loss
is set to ours: AdamW with the same ``lr`` and no weight decay, a constant learning rate (the
Trainer's default schedule is linear decay), no gradient clipping (its default is 1.0), no
gradient checkpointing, no truncation (``max_length=None``), a sequential sampler (step ``k``
sees our step ``k``'s rows), dropout off (TRL's default).

Only the input is shimmed, never the computation: the rows are token ids already, so TRL's
text preparation is skipped and its tokenized columns are handed in (``DPOTrainer``:
``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``, what its ``tokenize_fn`` outputs;
``ORPOTrainer``: the ``prompt_*`` / ``chosen_*`` / ``rejected_*`` columns of its
``tokenize_row``). The tokenizer handed to TRL is a minimal fast tokenizer that knows only the
pad / eos ids (TRL reads nothing else from it once the rows are tokenized).

:func:`one_token_prompt_tokenizer` is a config ``_component_`` for the ORPO comparison: TRL's
ORPO trainer puts its NLL term on the prompt tokens as well (trl #1516, kept by #2527: the
original ORPO code does), ours on the completion (the paper's equation). With a prompt of one
token the two are the same (the first token is never predicted), so on such rows the steps
must be equal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch

from torchtune_prefopt.data import CROSS_ENTROPY_IGNORE_IDX


def split_rows(items: Sequence[Dict[str, List[int]]]) -> Dict[str, List[List[int]]]:
    """Our paired items (``chosen_input_ids`` with labels -100 on the prompt) as TRL's
    tokenized columns; the prompt is the same tokens in both sequences (asserted)."""
    cols: Dict[str, List[List[int]]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for it in items:
        n = it["chosen_labels"].count(CROSS_ENTROPY_IGNORE_IDX)
        assert it["chosen_labels"][:n] == [CROSS_ENTROPY_IGNORE_IDX] * n, "labels: prompt first"
        assert it["chosen_input_ids"][:n] == it["rejected_input_ids"][:n], "prompts differ"
        assert it["rejected_labels"].count(CROSS_ENTROPY_IGNORE_IDX) == n
        cols["prompt_ids"].append(list(it["chosen_input_ids"][:n]))
        cols["chosen_ids"].append(list(it["chosen_input_ids"][n:]))
        cols["rejected_ids"].append(list(it["rejected_input_ids"][n:]))
    return cols


def _minimal_tokenizer(pad_id: int, eos_id: int):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": pad_id, "<eos>": eos_id}
    assert len(set(vocab.values())) == 3, vocab
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _orpo_columns(cols: Dict[str, List[List[int]]]) -> Dict[str, List[List[int]]]:
    """TRL ORPO's tokenized row layout (its ``tokenize_row`` output for a decoder-only model):
    ``prompt_*``, ``chosen_*``/``rejected_*`` = prompt + completion, labels -100 on the prompt."""
    out: Dict[str, List[List[int]]] = {}
    prompts = cols["prompt_ids"]
    out["prompt_input_ids"] = prompts
    out["prompt_attention_mask"] = [[1] * len(p) for p in prompts]
    for side in ("chosen", "rejected"):
        seqs = [p + c for p, c in zip(prompts, cols[f"{side}_ids"])]
        out[f"{side}_input_ids"] = seqs
        out[f"{side}_attention_mask"] = [[1] * len(s) for s in seqs]
        out[f"{side}_labels"] = [
            [CROSS_ENTROPY_IGNORE_IDX] * len(p) + c for p, c in zip(prompts, cols[f"{side}_ids"])
        ]
    return out


def build_trl(
    trainer: str,
    checkpoint_dir: Path,
    items: Sequence[Dict[str, List[int]]],
    *,
    pad_id: int,
    eos_id: int,
    batch_size: int,
    steps: int,
    lr: float,
    output_dir: Path,
    **loss_args: Any,
) -> Tuple[Any, Dict[int, Dict[str, float]]]:
    """TRL's ``"dpo"`` or ``"orpo"`` trainer, set up to train ``steps`` steps on ``items`` (in
    order), not yet trained.

    ``loss_args`` go to ``DPOConfig`` / ``ORPOConfig`` (``beta``, ``loss_type``,
    ``loss_weights``). Returns ``(TRL's trainer, {step: its logged metrics}: filled by
    training)``.
    """
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, TrainerCallback

    if trainer == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer
    elif trainer == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    else:
        raise ValueError(trainer)

    cols = split_rows(items)
    dataset = Dataset.from_dict(cols if trainer == "dpo" else _orpo_columns(cols))
    logs: Dict[int, Dict[str, float]] = {}

    class StepLogs(TrainerCallback):
        def on_log(self, args, state, control, **kwargs):
            record = kwargs.get("logs")
            if record and "loss" in record:
                logs[int(state.global_step)] = {k: float(v) for k, v in record.items()}

    class TokenIdsTrainer(Trainer):
        """TRL's trainer with the rows handed in as token ids and a sequential sampler."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    if trainer == "orpo":
        # its __init__ maps tokenize_row over the rows: they are tokenized already
        TokenIdsTrainer.tokenize_row = lambda self, feature, model=None: feature

    def load():
        return AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), dtype=torch.float32)

    model = load()
    # DPO's frozen reference: a second copy of the checkpoint, handed in (TRL would rebuild it
    # from config.architectures, which the tiny checkpoint's config does not name)
    extra = {"ref_model": load()} if trainer == "dpo" else {}
    common = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        optim="adamw_torch",
        max_steps=steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        gradient_checkpointing=False,
        use_cpu=True,
        bf16=False,  # TRL's configs default to bf16 (autocast): the comparison is in fp32
        dataloader_num_workers=0,
        seed=0,
        remove_unused_columns=False,
        # DPO: no truncation; ORPO: the rows are tokenized already, this only sizes its padding
        max_length=None if trainer == "dpo" else 512,
    )
    args = Config(**common, **loss_args)
    run = TokenIdsTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=_minimal_tokenizer(pad_id, eos_id),
        callbacks=[StepLogs()],
        **extra,
    )
    return run, logs


def run_trl(
    *args: Any, **kwargs: Any
) -> Tuple[Dict[int, Dict[str, float]], Dict[str, torch.Tensor]]:
    """Train :func:`build_trl`'s trainer; returns ``({step: TRL's logged metrics}, final state
    dict)`` (the logs also go to ``output_dir/trl_logs.json``)."""
    run, logs = build_trl(*args, **kwargs)
    run.train()
    state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    (Path(kwargs["output_dir"]) / "trl_logs.json").write_text(json.dumps(logs))
    return logs, state


def trl_loss(run, rows: Sequence[int]) -> float:
    """TRL's own training loss (its ``compute_loss``, no step) on dataset ``rows`` as one
    device's batch (collated by its own collator)."""
    batch = run.data_collator([run.train_dataset[i] for i in rows])
    run.model.train()
    with torch.no_grad():
        return float(run.compute_loss(run.model, batch))


def one_token_prompt_tokenizer(max_seq_len=None):
    """The tiny tokenizer (Qwen2.5 ChatML over the bundled vocab) rendering every prompt as
    the one token ``<|im_start|>`` and the answer as its content tokens + ``<|im_end|>``."""
    from torchtune_prefopt.models.tiny import tiny_tokenizer

    base = tiny_tokenizer(max_seq_len=max_seq_len)

    class OneTokenPrompt(type(base)):
        def tokenize_prompt_completion(self, messages):
            start = self.special_tokens["<|im_start|>"]
            last = messages[-1]  # a validated message dict (or a torchtune Message)
            text = last["content"] if isinstance(last, dict) else last.text_content
            answer = self.encode(text, add_bos=False, add_eos=False)
            return [start], answer + [self.eos_id]

    base.__class__ = OneTokenPrompt
    return base
