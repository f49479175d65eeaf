"""Step for step equal to TRL 1.16 on the same token ids: the recipe (one process, in this
pytest process) and TRL's own trainer (``trl_harness.run_trl``) start from the same tiny HF
checkpoint, train on the same rows in the same order with the same AdamW, and must log the same
loss, log-probs and rewards at every step and end with the same weights.

Covered: DPO (the control), ``dpo_norm`` = TRL ``loss_type=["sigmoid_norm"]``, DPO +
``sft_weight`` = ``["sigmoid", "sft"]`` with ``loss_weights=[1, w]``, a three-term
``WeightedSum`` = TRL's three-entry ``loss_type`` list with the same weights, ``apo_zero`` = TRL
``apo_zero``, ``orpo`` = TRL's ORPO trainer (on one-token prompts: see ``trl_harness``). Then the
SFT term's normalisation: on one process our global token mean is TRL's per-device mean; split
over two devices TRL's value is the mean of the two shards' token means (its own
``_compute_loss`` on each shard), which is not the token mean of the batch, while ours on two
processes (``test_loss_terms_recipe``'s 1-vs-2-process runs) is unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from trl_harness import build_trl, run_trl, trl_loss

from tune_harness import (
    assert_same_training,
    load_weights,
    run_in_process,
    run_recipe,
    step_metrics,
    synthetic_rows,
    tiny_config,
    write_jsonl,
)

pytestmark = pytest.mark.slow

ROWS, BATCH, STEPS, LR, BETA = 12, 4, 3, 1e-3, 0.1
DPO = "torchtune_prefopt.losses.DPOLoss"
# name: (TRL trainer, our loss config, TRL's loss arguments)
CASES = {
    "dpo": ("dpo", {"_component_": DPO, "beta": BETA}, {"loss_type": ["sigmoid"]}),
    "dpo_norm": (
        "dpo",
        {"_component_": "torchtune_prefopt.losses.DPONormLoss", "beta": BETA},
        {"loss_type": ["sigmoid_norm"]},
    ),
    "dpo_sft": (
        "dpo",
        {"_component_": DPO, "beta": BETA, "sft_weight": 0.3},
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.3]},
    ),
    "weighted_sum": (
        "dpo",
        {
            "_component_": "torchtune_prefopt.losses.WeightedSum",
            "terms": [
                {"loss": "dpo", "weight": 1.0, "beta": BETA},
                {"loss": "apo_zero", "weight": 0.5, "beta": BETA},
                {"loss": "sft", "weight": 0.2},
            ],
        },
        {"loss_type": ["sigmoid", "apo_zero", "sft"], "loss_weights": [1.0, 0.5, 0.2]},
    ),
    "apo_zero": (
        "dpo",
        {"_component_": "torchtune_prefopt.losses.APOZeroLoss", "beta": BETA},
        {"loss_type": ["apo_zero"]},
    ),
    "orpo": ("orpo", {"_component_": "torchtune_prefopt.losses.ORPOLoss", "lambda_": BETA}, {}),
}
# compared at every step (same name in our log and TRL's): the loss, the policy's summed
# log-probs, the rewards (beta * summed log-ratio) where ours log the same quantity
PAIRED = ("loss", "logps/chosen", "logps/rejected")
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
METRICS = {
    "dpo": PAIRED + REWARDS,
    "dpo_sft": PAIRED + REWARDS,
    "weighted_sum": PAIRED + REWARDS,
    "apo_zero": PAIRED + REWARDS,
    # ours log the length-normalised reward the loss sees; TRL logs beta * the summed log-ratio
    "dpo_norm": PAIRED + ("rewards/accuracies",),
    # TRL's ORPO logs per-token mean log-probs as logps/* (ours: sums); rewards are beta * mean
    "orpo": ("loss",) + REWARDS,
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from torchtune_prefopt.models.tiny import make_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("trl_equality")
    return make_tiny_hf_checkpoint(root / "base", seed=0)


def _tokenizer(case: str) -> dict:
    one_token = CASES[case][0] == "orpo"
    return {
        "_component_": "trl_harness.one_token_prompt_tokenizer"
        if one_token
        else "torchtune_prefopt.models.tiny.tiny_tokenizer",
        "max_seq_len": 64,
    }


def _rows():
    """The synthetic pairs with chosen answers of different lengths (the bundled ones all
    tokenize to 11 chosen tokens, which would make every token mean a row mean)."""
    rows = synthetic_rows(ROWS)
    for i, row in enumerate(rows):
        row["chosen"] += " Glad to help." * (i % 4)
    return rows


def _our_config(work: Path, ckpt: Path, case: str, **edits):
    from omegaconf import OmegaConf

    work.mkdir(parents=True)
    path = tiny_config(
        work,
        "dpo",
        rows=ROWS,
        loss=CASES[case][1],
        tokenizer=_tokenizer(case),
        lr_scheduler=None,
        clip_grad_norm=None,
        shuffle=False,
        batch_size=BATCH,
        save_every_n_steps=None,
        **{"optimizer.lr": LR, "checkpointer.checkpoint_dir": str(ckpt), **edits},
    )
    write_jsonl(work / "train.jsonl", _rows())  # the config's dataset file
    return path, OmegaConf.load(path)


def _items(case: str, data: Path):
    from omegaconf import OmegaConf
    from torchtune.config import instantiate

    from torchtune_prefopt.data import preference_dataset

    tok = instantiate(OmegaConf.create(_tokenizer(case)))
    ds = preference_dataset(tok, source="json", data_files=str(data))
    return [ds[i] for i in range(len(ds))], tok


def _trl(case: str, ckpt: Path, items, tok, out: Path):
    trainer, _, trl_args = CASES[case]
    return run_trl(
        trainer,
        ckpt,
        items,
        pad_id=tok.pad_id,
        eos_id=tok.eos_id,
        batch_size=BATCH,
        steps=STEPS,
        lr=LR,
        output_dir=out,
        beta=BETA,
        **trl_args,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_steps_equal_trl(case, base, tmp_path):
    """Per-step loss, log-probs and rewards within fp32 rounding (rel 1e-5) of TRL's, and the
    same final weights (every tensor within 5e-5 after three lr-1e-3 Adam steps, Adam turning
    rounding in near-zero gradients into lr-sized moves; the updates differ by < 1e-3 of their
    norm)."""
    path, cfg = _our_config(tmp_path / "ours", base, case)
    run_in_process(cfg)
    ours = step_metrics(Path(cfg.output_dir))[0]
    items, tok = _items(case, path.parent / "train.jsonl")
    theirs, their_weights = _trl(case, base, items[: BATCH * STEPS], tok, tmp_path / "trl")
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    for step in ours:
        for key in METRICS[case]:
            if key == "rewards/accuracies" and step == 1:
                continue  # policy = reference: every margin is 0, a tie (ours 0.5, TRL's 0)
            assert ours[step][key] == pytest.approx(theirs[step][key], rel=1e-5, abs=1e-6), (
                f"{case} step {step} {key}: ours {ours[step][key]} TRL {theirs[step][key]}"
            )
    our_weights = load_weights(Path(cfg.output_dir) / "final")
    assert_same_training(our_weights, their_weights, load_weights(base), case, 5e-5, 1e-3)


def test_sft_term_token_mean_is_global(base, tmp_path):
    """DPO + ``sft_weight``: on one process ours is TRL's (``test_steps_equal_trl[dpo_sft]``);
    on two processes with half the batch each, ours is unchanged at every step (the chosen
    token counts are all-reduced), while TRL's rule on two devices (its own loss on each device's
    half of the step-1 batch, averaged as DDP averages the gradients) is not its one-device
    value: a mean of the two halves' token means, not the batch's token mean."""
    import math
    import shutil

    from safetensors.torch import load_file, save_file

    from tune_harness import describe

    # the tiny checkpoint with its LM head scaled x30: peaked predictions, so the chosen
    # tokens' NLLs differ (at the random init they are all ~log(vocab) and every mean is one)
    peaked = tmp_path / "peaked"
    shutil.copytree(base, peaked, ignore=shutil.ignore_patterns("tiny_checkpoint.json"))
    weights = load_file(str(peaked / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] * 30
    save_file(weights, str(peaked / "model.safetensors"), metadata={"format": "pt"})
    checkpointer = {
        "_component_": "torchtune.training.FullModelHFCheckpointer",
        "checkpoint_dir": str(peaked),
        "checkpoint_files": ["model.safetensors"],
        "model_type": "QWEN2",
        "output_dir": "${output_dir}",
    }
    path, cfg = _our_config(tmp_path / "one", peaked, "dpo_sft", checkpointer=checkpointer)
    run_in_process(cfg)
    one = step_metrics(Path(cfg.output_dir))[0]
    two_dir = tmp_path / "two"
    proc = run_recipe(
        path, f"batch_size={BATCH // 2}", f"output_dir={two_dir}", cwd=tmp_path, nproc=2
    )
    assert proc.returncode == 0, describe(proc)
    two = step_metrics(two_dir)[0]
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        for key in PAIRED:
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5), (step, key)

    items, tok = _items("dpo_sft", path.parent / "train.jsonl")
    run, _ = build_trl(
        "dpo",
        peaked,
        items[:BATCH],
        pad_id=tok.pad_id,
        eos_id=tok.eos_id,
        batch_size=BATCH,
        steps=1,
        lr=LR,
        output_dir=tmp_path / "trl",
        beta=BETA,
        loss_type=["sft"],
    )
    sft_weight = CASES["dpo_sft"][1]["sft_weight"]
    one_device = trl_loss(run, range(BATCH))
    # step 1: policy = reference, so the DPO part of our loss is exactly log 2
    assert one[1]["loss"] == pytest.approx(math.log(2) + sft_weight * one_device, rel=1e-6)
    half = BATCH // 2
    two_devices = (trl_loss(run, range(half)) + trl_loss(run, range(half, BATCH))) / 2
    assert abs(two_devices - one_device) > 1e-3 * one_device, (one_device, two_devices)
