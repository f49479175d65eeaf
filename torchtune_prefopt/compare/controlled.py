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
from typing import Any, Dict, List, Optional, Sequence

from torchtune_prefopt.compare.gold import ListTask, bradley_terry_label
from torchtune_prefopt.errors import PrefOptUserError

__all__ = ["ControlledListTask", "chat_prompt_ids"]

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
        for name, v in (
            ("sft_examples", sft_examples),
            ("sft_steps", sft_steps),
            ("sft_batch_size", sft_batch_size),
            ("train_pairs", train_pairs),
            ("heldout_pairs", heldout_pairs),
            ("max_new_tokens", max_new_tokens),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"compare.task.{name} must be an integer >= 1, got {v!r}")
        if bt_scale is not None and not float(bt_scale) > 0:
            raise ValueError(f"compare.task.bt_scale must be > 0 or null, got {bt_scale!r}")
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
        from torchtune import training

        from torchtune_prefopt.compare.evaluation import build_eval_model
        from torchtune_prefopt.compare.generation import decode_completion, generate_completions
        from torchtune_prefopt.models.hf_checkpoint import TorchtuneCheckpoint
        from torchtune_prefopt.models.tiny import tiny_tokenizer

        p = self.params
        tokenizer = tiny_tokenizer(max_seq_len=64)
        stop = list(tokenizer.stop_tokens)
        device, dtype = torch.device("cpu"), torch.float32
        from omegaconf import OmegaConf

        model = build_eval_model(
            OmegaConf.create({"_component_": "torchtune_prefopt.models.tiny.tiny_qwen2"}),
            TorchtuneCheckpoint.over(
                task_dir / "sft" / "epoch_0", "QWEN2", task_dir / ".scratch"
            ).load(),
            device,
            dtype,
        )
        shutil.rmtree(task_dir / ".scratch", ignore_errors=True)
        stats: Dict[str, Any] = {}
        for split, n_pairs, seed_offset in (
            ("train", p["train_pairs"], 1),
            ("heldout", p["heldout_pairs"], 2),
        ):
            rng = random.Random(p["seed"] * 1000 + seed_offset)
            prompts = self.task.prompts(split)
            ids = chat_prompt_ids(tokenizer, prompts)
            # 20% extra draws cover pairs dropped for identical responses
            n_draw = n_pairs + max(8, n_pairs // 5)
            which = [rng.randrange(len(prompts)) for _ in range(n_draw)]
            flat = [ids[i] for i in which for _ in range(2)]
            with training.set_default_dtype(dtype):
                completions = generate_completions(
                    model,
                    flat,
                    max_new_tokens=p["max_new_tokens"],
                    stop_tokens=stop,
                    pad_id=int(tokenizer.pad_id),
                    device=device,
                    dtype=dtype,
                    temperature=1.0,
                    seed=p["seed"] * 1000 + seed_offset,
                    batch_size=128,
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
                ra, rb = self.task.reward(prompts[i], a), self.task.reward(prompts[i], b)
                rewards += [ra, rb]
                a_wins = bradley_terry_label(ra, rb, p["bt_scale"], rng)
                (cw, rw), (cr, rr) = ((a, ra), (b, rb)) if a_wins else ((b, rb), (a, ra))
                agree += (rw > rr) + 0.5 * (rw == rr)
                rows.append(
                    {
                        "prompt": prompts[i],
                        "chosen": cw,
                        "rejected": cr,
                        "chosen_gold": rw,
                        "rejected_gold": rr,
                    }
                )
                if len(rows) == n_pairs:
                    break
            if len(rows) < n_pairs:
                raise RuntimeError(
                    f"the SFT model gave only {len(rows)} distinct pairs of {n_pairs} ({split})"
                )
            with (task_dir / f"pairs_{split}.jsonl").open("w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            stats[split] = {
                "pairs": len(rows),
                "prompts": len(prompts),
                "dropped_identical": dropped,
                "dropped_empty": empty,
                "label_agrees_with_gold": agree / len(rows),
                "sft_mean_gold": sum(rewards) / len(rewards),
            }
        return stats

    # ------------------------------------------------------------------ entry point
    def prepare(self, task_dir) -> Dict[str, Any]:
        """Prepare (or reuse) ``task_dir``; returns ``{"overrides": [...], "manifest": {...}}``.

        ``overrides`` point a ``prefopt_distributed`` config at the SFT checkpoint (policy
        init and reference), the training pairs (``dataset``) and the held-out pairs
        (``eval_dataset``).
        """
        task_dir = Path(task_dir).expanduser().absolute()
        manifest_path = task_dir / _MANIFEST
        settings = json.loads(json.dumps(self.settings()))
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("settings") != settings:
                raise PrefOptUserError(
                    f"{task_dir} was prepared with other compare.task settings; use a new "
                    "output_dir (nothing there is reused or overwritten)"
                )
        else:
            task_dir.mkdir(parents=True, exist_ok=True)
            if not (task_dir / _SFT_DONE).is_file():
                self._write_sft_data(task_dir / "sft.jsonl")
                self._run_sft(task_dir)
            stats = self._sample_pairs(task_dir)
            manifest = {"settings": settings, "stats": stats}
            tmp = manifest_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")
            os.replace(tmp, manifest_path)
        weights = sorted(p.name for p in (task_dir / "sft" / "epoch_0").glob("*.safetensors"))
        data = {"_component_": "torchtune_prefopt.data.preference_dataset", "source": "json"}
        overrides = {
            "checkpointer": {
                "_component_": "torchtune.training.FullModelHFCheckpointer",
                "checkpoint_dir": str(task_dir / "sft" / "epoch_0"),
                "checkpoint_files": weights,
                "model_type": "QWEN2",
                "output_dir": "${output_dir}",
            },
            "dataset": {
                **data,
                "data_files": str(task_dir / "pairs_train.jsonl"),
                "split": "train",
            },
            "eval_dataset": {
                **data,
                "data_files": str(task_dir / "pairs_heldout.jsonl"),
                "split": "train",
            },
        }
        return {"overrides": overrides, "manifest": manifest}
