"""The bundled controlled experiment behind the frontier (``compare.task``).

:class:`ControlledListTask` prepares, once per comparison output directory
(``<output_dir>/task``), everything the matched preference runs then train on:

1. **SFT base.** ``sft_examples`` answers drawn from the task's base distribution
   (:meth:`~torchtune_prefopt.compare.gold.ListTask.sample_base`) on the training prompts, and
   torchtune's own ``full_finetune_single_device`` recipe (``tune run``, a subprocess; its
   config is written to ``task/sft.yaml``) fine-tunes the tiny model on them from its
   seeded random init. The result (``task/sft/epoch_0``, HF format) is both the policy
   init and the reference of every run.
2. **Preference pairs.** Two completions per pair sampled from the SFT model (temperature 1,
   seeded, the prompts tokenized by the same pipeline as training), scored by the gold
   reward and ordered by Bradley-Terry with ``bt_scale``
   (:func:`~torchtune_prefopt.compare.gold.bradley_terry_label`). Pairs whose two responses
   are the same text, or with an empty response, are dropped (counted). ``task/pairs_train.jsonl`` (training prompts) and
   ``task/pairs_heldout.jsonl`` (held-out prompt templates) hold prompt / chosen / rejected
   plus both gold rewards; KTO trains on the same completions as unpaired rows (the
   comparison's usual paired -> unpaired switch).
3. ``task/manifest.json``: the settings, counts, the SFT model's reward on the pairs, and
   how often the label agrees with the higher reward. A directory prepared with other
   settings is never reused or overwritten (one-line error); an interrupted preparation
   redoes the steps without their completion marker.

:meth:`ControlledListTask.prepare` returns the ``prefopt_distributed`` overrides that point a
base config (e.g. ``tiny/dpo``) at the SFT checkpoint and the labelled pairs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torchtune_prefopt.compare.gold import ListTask, bradley_terry_label
from torchtune_prefopt.errors import PrefOptUserError

__all__ = [
    "REVIEW_PRODUCTS",
    "ControlledListTask",
    "ControlledSentimentTask",
    "chat_prompt_ids",
    "sample_labelled_pairs",
]

_MANIFEST = "manifest.json"
_SFT_DONE = "sft/DONE"


def chat_prompt_ids(tokenizer, prompts: Sequence[str]) -> List[List[int]]:
    """Prompt tokens exactly as the preference data pipeline builds them (chat template plus
    the assistant header), via :func:`~torchtune_prefopt.data.preference_dataset` on
    placeholder answers."""
    import tempfile

    from torchtune_prefopt.compare.generation import prompt_ids
    from torchtune_prefopt.data import preference_dataset

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.jsonl"
        with path.open("w") as f:
            for p in prompts:
                f.write(json.dumps({"prompt": p, "chosen": "a", "rejected": "b"}) + "\n")
        ds = preference_dataset(tokenizer, source="json", data_files=str(path), split="train")
        return [prompt_ids(ds[i]) for i in range(len(ds))]


def sample_labelled_pairs(
    model,
    tokenizer,
    prompts: Dict[str, Sequence[str]],
    n_pairs: Dict[str, int],
    reward,
    task_dir: Path,
    *,
    max_new_tokens: int,
    bt_scale: Optional[float],
    seed: int,
    device,
    dtype,
    what: str,
    batch_size: int = 128,
) -> Dict[str, Any]:
    """Per split: two completions per drawn prompt sampled from ``model`` (temperature 1,
    seeded, the prompts tokenized by the training pipeline), both scored by the gold
    ``reward(prompt, response)`` and ordered by Bradley-Terry with ``bt_scale``
    (:func:`~torchtune_prefopt.compare.gold.bradley_terry_label`); pairs with an empty or two
    identical responses are dropped and counted. Writes ``task_dir/pairs_<split>.jsonl``
    (prompt, chosen, rejected, chosen_gold, rejected_gold) and returns the counts."""
    from torchtune import training

    from torchtune_prefopt.compare.generation import decode_completion, generate_completions

    stop = list(tokenizer.stop_tokens)
    stats: Dict[str, Any] = {}
    for offset, split in enumerate(("train", "heldout"), start=1):
        rng = random.Random(seed * 1000 + offset)
        split_prompts = list(prompts[split])
        ids = chat_prompt_ids(tokenizer, split_prompts)
        # 20% extra draws cover pairs dropped for identical responses
        n_draw = n_pairs[split] + max(8, n_pairs[split] // 5)
        which = [rng.randrange(len(split_prompts)) for _ in range(n_draw)]
        flat = [ids[i] for i in which for _ in range(2)]
        with training.set_default_dtype(dtype):
            completions = generate_completions(
                model,
                flat,
                max_new_tokens=max_new_tokens,
                stop_tokens=stop,
                pad_id=int(tokenizer.pad_id),
                device=device,
                dtype=dtype,
                temperature=1.0,
                seed=seed * 1000 + offset,
                batch_size=batch_size,
            )
        rows, dropped, empty, agree, rewards = [], 0, 0, 0, []
        for k, i in enumerate(which):
            a = decode_completion(tokenizer, completions[2 * k], stop)
            b = decode_completion(tokenizer, completions[2 * k + 1], stop)
            if not a.strip() or not b.strip():
                empty += 1  # a preference row needs two non-empty answers
                continue
            if a.strip() == b.strip():
                dropped += 1
                continue
            ra, rb = reward(split_prompts[i], a), reward(split_prompts[i], b)
            rewards += [ra, rb]
            a_wins = bradley_terry_label(ra, rb, bt_scale, rng)
            (cw, rw), (cr, rr) = ((a, ra), (b, rb)) if a_wins else ((b, rb), (a, ra))
            agree += (rw > rr) + 0.5 * (rw == rr)
            rows.append(
                {
                    "prompt": split_prompts[i],
                    "chosen": cw,
                    "rejected": cr,
                    "chosen_gold": rw,
                    "rejected_gold": rr,
                }
            )
            if len(rows) == n_pairs[split]:
                break
        if len(rows) < n_pairs[split]:
            raise RuntimeError(
                f"{what} gave only {len(rows)} distinct pairs of {n_pairs[split]} ({split})"
            )
        with (task_dir / f"pairs_{split}.jsonl").open("w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        stats[split] = {
            "pairs": len(rows),
            "prompts": len(split_prompts),
            "dropped_identical": dropped,
            "dropped_empty": empty,
            "label_agrees_with_gold": agree / len(rows),
            "sft_mean_gold": sum(rewards) / len(rewards),
        }
    return stats


def _check_task_args(bt_scale: Optional[float], **counts: Any) -> None:
    """``compare.task`` arguments: counts are integers >= 1, ``bt_scale`` > 0 or null."""
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"compare.task.{name} must be an integer >= 1, got {v!r}")
    if bt_scale is not None and not float(bt_scale) > 0:
        raise ValueError(f"compare.task.bt_scale must be > 0 or null, got {bt_scale!r}")


class ControlledListTask:
    """The bundled list task (:class:`~torchtune_prefopt.compare.gold.ListTask`) as a
    comparison's ``compare.task``: SFT base + Bradley-Terry-labelled pairs, and the gold reward.

    Args:
        sft_examples, sft_steps, sft_batch_size, sft_lr: the SFT data size and torchtune
            recipe settings (AdamW, cross-entropy on the answer tokens).
        train_pairs, heldout_pairs: labelled pairs on the training / held-out prompts.
        bt_scale: Bradley-Terry scale of the labels (``None``: deterministic).
        max_new_tokens: completion length limit when sampling pairs.
        seed: one seed for the SFT data, the SFT run, the random init and the pair sampling.
        task: keyword arguments of :class:`~torchtune_prefopt.compare.gold.ListTask`.
    """

    def __init__(
        self,
        sft_examples: int = 19200,
        sft_steps: int = 1200,
        sft_batch_size: int = 16,
        sft_lr: float = 1e-3,
        train_pairs: int = 768,
        heldout_pairs: int = 96,
        bt_scale: Optional[float] = 1.0,
        max_new_tokens: int = 16,
        seed: int = 0,
        task: Optional[Dict[str, Any]] = None,
    ):
        _check_task_args(
            bt_scale,
            sft_examples=sft_examples,
            sft_steps=sft_steps,
            sft_batch_size=sft_batch_size,
            train_pairs=train_pairs,
            heldout_pairs=heldout_pairs,
            max_new_tokens=max_new_tokens,
        )
        self.task = ListTask(**dict(task or {}))
        self.params = {
            "sft_examples": sft_examples,
            "sft_steps": sft_steps,
            "sft_batch_size": sft_batch_size,
            "sft_lr": float(sft_lr),
            "train_pairs": train_pairs,
            "heldout_pairs": heldout_pairs,
            "bt_scale": None if bt_scale is None else float(bt_scale),
            "max_new_tokens": max_new_tokens,
            "seed": int(seed),
        }

    @property
    def gold_reward(self) -> ListTask:
        return self.task

    def settings(self) -> Dict[str, Any]:
        return {"task": "ListTask", **self.params, "list_task": self.task.settings()}

    # ------------------------------------------------------------------ steps
    def _write_sft_data(self, path: Path) -> None:
        rng = random.Random(self.params["seed"])
        prompts = self.task.prompts("train")
        with path.open("w") as f:
            for _ in range(self.params["sft_examples"]):
                p = prompts[rng.randrange(len(prompts))]
                f.write(json.dumps({"prompt": p, "response": self.task.sample_base(p, rng)}) + "\n")

    def _sft_config(self, task_dir: Path) -> Dict[str, Any]:
        p = self.params
        sft = task_dir / "sft"
        return {
            "output_dir": str(sft),
            "model": {"_component_": "torchtune_prefopt.models.tiny.tiny_qwen2"},
            "tokenizer": {
                "_component_": "torchtune_prefopt.models.tiny.tiny_tokenizer",
                "max_seq_len": 64,
            },
            "checkpointer": {
                "_component_": "torchtune_prefopt.models.tiny.tiny_hf_checkpointer",
                "checkpoint_dir": str(task_dir / "init"),
                "output_dir": str(sft),
                "seed": p["seed"],
            },
            "resume_from_checkpoint": False,
            "dataset": {
                # not torchtune's instruct_dataset: it leaves the final <|im_end|> unlabelled
                "_component_": "torchtune_prefopt.data.sft_dataset",
                "source": "json",
                "data_files": str(task_dir / "sft.jsonl"),
                "split": "train",
            },
            "seed": p["seed"],
            "shuffle": True,
            "batch_size": p["sft_batch_size"],
            "epochs": 1,
            "max_steps_per_epoch": p["sft_steps"],
            "gradient_accumulation_steps": 1,
            "optimizer": {
                "_component_": "torch.optim.AdamW",
                "lr": p["sft_lr"],
                "weight_decay": 0.0,
            },
            "optimizer_in_bwd": False,
            "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
            "clip_grad_norm": 1.0,
            "device": "cpu",
            "dtype": "fp32",
            "compile": False,
            "enable_activation_checkpointing": False,
            "metric_logger": {
                "_component_": "torchtune.training.metric_logging.DiskLogger",
                "log_dir": str(sft / "logs"),
            },
            "log_every_n_steps": 10,
            "log_peak_memory_stats": False,
            "profiler": {
                "_component_": "torchtune.training.setup_torch_profiler",
                "enabled": False,
            },
        }

    def _run_sft(self, task_dir: Path) -> None:
        """torchtune's ``full_finetune_single_device`` on the SFT data (output in a log file)."""
        import yaml

        from torchtune_prefopt.compare.runs import tune_executable
        from torchtune_prefopt.training.distributed import LAUNCHER_ENV

        sft = task_dir / "sft"
        shutil.rmtree(sft, ignore_errors=True)  # an interrupted SFT run of ours: redo it
        cfg_path = task_dir / "sft.yaml"
        cfg_path.write_text(yaml.safe_dump(self._sft_config(task_dir), sort_keys=False))
        # epochs=1 must hold enough rows for sft_steps batches
        need = self.params["sft_steps"] * self.params["sft_batch_size"]
        if self.params["sft_examples"] < need:
            raise PrefOptUserError(
                f"compare.task: sft_examples={self.params['sft_examples']} < sft_steps x "
                f"sft_batch_size = {need} (one epoch must hold every step)"
            )
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
        log_path = task_dir / "sft.log"
        cmd = tune_executable() + ["run", "full_finetune_single_device", "--config", str(cfg_path)]
        with log_path.open("w") as fh:
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        if rc != 0:
            tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise RuntimeError(f"the SFT run failed (exit {rc}); output in {log_path}:\n{tail}")
        (task_dir / _SFT_DONE).write_text("ok\n")

    def _sample_pairs(self, task_dir: Path) -> Dict[str, Any]:
        """Sample, score and label the train / held-out pairs from the SFT model."""
        import torch
        from omegaconf import OmegaConf

        from torchtune_prefopt.compare.evaluation import build_eval_model
        from torchtune_prefopt.models.hf_checkpoint import TorchtuneCheckpoint
        from torchtune_prefopt.models.tiny import tiny_tokenizer

        device, dtype = torch.device("cpu"), torch.float32
        model = build_eval_model(
            OmegaConf.create({"_component_": "torchtune_prefopt.models.tiny.tiny_qwen2"}),
            TorchtuneCheckpoint.over(
                task_dir / "sft" / "epoch_0", "QWEN2", task_dir / ".scratch"
            ).load(),
            device,
            dtype,
        )
        shutil.rmtree(task_dir / ".scratch", ignore_errors=True)
        return sample_labelled_pairs(
            model,
            tiny_tokenizer(max_seq_len=64),
            {split: self.task.prompts(split) for split in ("train", "heldout")},
            {"train": self.params["train_pairs"], "heldout": self.params["heldout_pairs"]},
            self.task.reward,
            task_dir,
            max_new_tokens=self.params["max_new_tokens"],
            bt_scale=self.params["bt_scale"],
            seed=self.params["seed"],
            device=device,
            dtype=dtype,
            what="the SFT model",
        )

    # ------------------------------------------------------------------ entry point
    def prepare(self, task_dir) -> Dict[str, Any]:
        """Prepare (or reuse) ``task_dir``; returns ``{"overrides": [...], "manifest": {...}}``.

        ``overrides`` point a ``prefopt_distributed`` config at the SFT checkpoint (policy
        init and reference), the training pairs (``dataset``) and the held-out pairs
        (``eval_dataset``).
        """
        task_dir = Path(task_dir).expanduser().absolute()

        def build() -> Dict[str, Any]:
            if not (task_dir / _SFT_DONE).is_file():
                self._write_sft_data(task_dir / "sft.jsonl")
                self._run_sft(task_dir)
            return self._sample_pairs(task_dir)

        manifest = prepared_manifest(task_dir, self.settings(), build)
        weights = sorted(p.name for p in (task_dir / "sft" / "epoch_0").glob("*.safetensors"))
        overrides = {
            "checkpointer": {
                "_component_": "torchtune.training.FullModelHFCheckpointer",
                "checkpoint_dir": str(task_dir / "sft" / "epoch_0"),
                "checkpoint_files": weights,
                "model_type": "QWEN2",
                "output_dir": "${output_dir}",
            },
            **pairs_overrides(task_dir),
        }
        return {"overrides": overrides, "manifest": manifest}


def prepared_manifest(task_dir: Path, settings: Dict[str, Any], build) -> Dict[str, Any]:
    """The task directory's manifest: reused when it was prepared with ``settings`` (another
    task's directory is one line, never reused or overwritten), else ``build()`` (returning the
    counts) runs and the manifest is written last, atomically."""
    manifest_path = task_dir / _MANIFEST
    settings = json.loads(json.dumps(settings))
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") != settings:
            raise PrefOptUserError(
                f"{task_dir} was prepared with other compare.task settings; use a new "
                "output_dir (nothing there is reused or overwritten)"
            )
        return manifest
    task_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"settings": settings, "stats": build()}
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    return manifest


def pairs_overrides(task_dir: Path) -> Dict[str, Any]:
    """``dataset`` / ``eval_dataset`` overrides over the task's labelled pairs."""
    data = {"_component_": "torchtune_prefopt.data.preference_dataset", "source": "json"}
    return {
        "dataset": {**data, "data_files": str(task_dir / "pairs_train.jsonl"), "split": "train"},
        "eval_dataset": {
            **data,
            "data_files": str(task_dir / "pairs_heldout.jsonl"),
            "split": "train",
        },
    }


#: what the sentiment task asks reviews of; training and held-out products are disjoint
REVIEW_PRODUCTS: Dict[str, Tuple[str, ...]] = {
    "train": (
        "a coffee maker",
        "a pair of running shoes",
        "a mountain bike",
        "a city hotel",
        "a pizza restaurant",
        "a science fiction novel",
        "a wireless headset",
        "a camping tent",
        "a board game",
        "a yoga class",
        "a winter jacket",
        "a smartphone",
        "a bakery",
        "a museum",
        "a road trip app",
        "a desk lamp",
        "an electric kettle",
        "a jazz album",
        "a language course",
        "a kitchen knife",
        "a vacuum cleaner",
        "a garden hose",
        "a hiking trail",
        "a train journey",
        "a sushi bar",
        "a laptop bag",
        "a fitness tracker",
        "a coffee shop",
        "a cookbook",
        "a music festival",
        "a pair of sunglasses",
        "a backpack",
        "a bookstore",
        "a streaming service",
        "a dentist",
        "a car wash",
        "a sleeping bag",
        "a water bottle",
        "a chess set",
        "a piano teacher",
    ),
    "heldout": (
        "a tea house",
        "a tennis racket",
        "a bicycle helmet",
        "a travel guide",
        "an ice cream parlor",
        "a photo printer",
        "a rain jacket",
        "a history podcast",
        "a flower shop",
        "a ferry ride",
    ),
}
REVIEW_PROMPT = "Write a short positive review of {product}."


class ControlledSentimentTask:
    """Sentiment-controlled generation on a real model (the DPO paper's §6.1 task in spirit) as
    a comparison's ``compare.task``: the model itself (``model_dir``, an HF folder: the policy
    init and the reference) answers "Write a short positive review of <product>." twice at
    temperature 1, and each pair is ordered by Bradley-Terry (``bt_scale``) on the gold reward
    :class:`~torchtune_prefopt.compare.gold.SentimentReward` (VADER sentiment with a length
    trade-off; ``gold``: its keyword arguments), which no loss sees. Training and held-out
    products are disjoint (:data:`REVIEW_PRODUCTS`). No SFT stage: the instruct model is the
    start. ``prepare`` writes ``pairs_{train,heldout}.jsonl`` and the manifest and returns the
    ``dataset`` / ``eval_dataset`` overrides (the base config keeps its own ``model_dir``).
    ``device``: where the pairs are sampled (fp32, KV cache; ``cuda`` for the GPU-sized run).
    """

    def __init__(
        self,
        model_dir: str,
        train_pairs: int = 256,
        heldout_pairs: int = 32,
        bt_scale: Optional[float] = 4.0,
        max_new_tokens: int = 64,
        seed: int = 0,
        batch_size: int = 32,
        gold: Optional[Dict[str, Any]] = None,
        device: str = "cpu",
    ):
        from torchtune_prefopt.compare.gold import SentimentReward

        _check_task_args(
            bt_scale,
            train_pairs=train_pairs,
            heldout_pairs=heldout_pairs,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"compare.task.device must be cpu or cuda[:N], got {device!r}")
        self.model_dir = Path(str(model_dir)).expanduser()
        self.device = device
        self.gold = SentimentReward(**dict(gold or {}))
        self.params = {
            "train_pairs": train_pairs,
            "heldout_pairs": heldout_pairs,
            "bt_scale": None if bt_scale is None else float(bt_scale),
            "max_new_tokens": max_new_tokens,
            "seed": int(seed),
            "batch_size": batch_size,
            "gold": dict(gold or {}),
            # another device draws other samples from the same seed (cpu, the default, is
            # left out: a task folder prepared on the CPU before this key existed stays valid)
            **({} if device == "cpu" else {"device": device}),
        }

    @property
    def gold_reward(self):
        return self.gold

    def settings(self) -> Dict[str, Any]:
        from torchtune_prefopt.models.hf.spec import read_config_json

        _, config = read_config_json(self.model_dir)  # the model's identity: its config.json
        return {"task": "SentimentTask", **self.params, "model_config": config}

    def prompts(self, split: str) -> List[str]:
        return [REVIEW_PROMPT.format(product=p) for p in REVIEW_PRODUCTS[split]]

    def prepare(self, task_dir) -> Dict[str, Any]:
        """Prepare (or reuse) ``task_dir``; returns ``{"overrides": {...}, "manifest": {...}}``."""
        import torch
        from torchtune import utils

        from torchtune_prefopt.compare.evaluation import hf_folder_eval_model
        from torchtune_prefopt.models.hf import hf_tokenizer

        task_dir = Path(task_dir).expanduser().absolute()

        def build() -> Dict[str, Any]:
            device, dtype = utils.get_device(self.device), torch.float32
            model = hf_folder_eval_model(self.model_dir, device, dtype)
            return sample_labelled_pairs(
                model,
                hf_tokenizer(str(self.model_dir)),
                {split: self.prompts(split) for split in ("train", "heldout")},
                {"train": self.params["train_pairs"], "heldout": self.params["heldout_pairs"]},
                self.gold,
                task_dir,
                max_new_tokens=self.params["max_new_tokens"],
                bt_scale=self.params["bt_scale"],
                seed=self.params["seed"],
                device=device,
                dtype=dtype,
                what=f"the model in {self.model_dir}",
                batch_size=self.params["batch_size"],
            )

        manifest = prepared_manifest(task_dir, self.settings(), build)
        return {"overrides": pairs_overrides(task_dir), "manifest": manifest}
