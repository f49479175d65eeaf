"""Evaluate trained policies against the reference on one held-out set.

:class:`HeldoutEvaluator` holds the tokenizer, the held-out pairs, the reference model and its
results; :meth:`HeldoutEvaluator.evaluate` runs one policy through every measurement
(held-out log-probs -> :func:`~torchtune_prefopt.compare.metrics.heldout_metrics`, greedy or
seeded generation -> lengths and judge win rate, sampled completions -> Monte-Carlo KL) and
returns the numbers plus per-row details for the report's JSONL files.

Models are plain (unsharded) torchtune ``TransformerDecoder`` s on one device. A LoRA run's
final checkpoint holds *merged* weights: the run's LoRA model builder is instantiated, the
merged weights are loaded into its base layers and the adapters are disabled, so no separate
non-LoRA builder has to be named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from torchtune_prefopt.compare.generation import (
    completion_lengths,
    completion_logps,
    decode_completion,
    generate_completions,
    prompt_ids,
)
from torchtune_prefopt.compare.gold import score_responses
from torchtune_prefopt.compare.judges import judge_win_rate
from torchtune_prefopt.compare.metrics import (
    HeldoutLogps,
    heldout_metrics,
    kl_estimate,
    prompt_mean,
)
from torchtune_prefopt.data import PairedBatch

__all__ = [
    "EvalSettings",
    "HeldoutEvaluator",
    "build_eval_model",
    "hf_folder_eval_model",
]


@dataclass
class EvalSettings:
    """What the comparison measures and how: built from ``compare.heldout/generation/kl`` by
    :func:`torchtune_prefopt.compare.settings.eval_settings` (the key table owns the
    defaults; :func:`~torchtune_prefopt.compare.settings.default_eval_settings` has them all)."""

    max_rows: Optional[int]
    batch_size: int
    chunk_size: int
    max_new_tokens: int
    temperature: float
    top_k: Optional[int]
    generation_seed: int
    generation_batch_size: int
    kv_cache: bool
    kl_samples_per_prompt: int
    kl_max_new_tokens: int
    kl_seed: int


def build_eval_model(
    model_cfg, state_dict: Dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """Instantiate ``model_cfg`` on ``device`` in ``dtype`` and load a full (merged) state dict.

    LoRA builders: the adapter weights are not in ``state_dict`` (merged checkpoints), so
    they stay at their init and every adapter is disabled.
    """
    from torchtune import config, training
    from torchtune.modules.peft import DoRALinear, LoRALinear

    with training.set_default_dtype(dtype), device:
        model = config.instantiate(model_cfg)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    adapters = [m for m in model.modules() if isinstance(m, (LoRALinear, DoRALinear))]
    bad_missing = [
        k for k in missing if not (adapters and ("lora_" in k or k.endswith("magnitude")))
    ]
    if bad_missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {bad_missing[:3]}{'...' if len(bad_missing) > 3 else ''}, "
            f"unexpected {list(unexpected)[:3]}"
        )
    for m in adapters:
        m.disabled = True
    training.disable_dropout(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def hf_folder_eval_model(model_dir, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """:func:`build_eval_model` of an HF model folder (``models.hf.hf_decoder``), its weights
    read through the one weight reader (:class:`~torchtune_prefopt.models.hf_checkpoint.HFCheckpoint`)."""
    import tempfile

    from omegaconf import OmegaConf

    from torchtune_prefopt.models.hf import hf_checkpointer
    from torchtune_prefopt.models.hf_checkpoint import HFCheckpoint

    with tempfile.TemporaryDirectory() as scratch:  # the checkpointer's output_dir (unused)
        weights = HFCheckpoint.of(hf_checkpointer(str(model_dir), scratch), "model_dir").load()
    node = {"_component_": "torchtune_prefopt.models.hf.hf_decoder", "model_dir": str(model_dir)}
    return build_eval_model(OmegaConf.create(node), weights, device, dtype)


def _float64_cpu(lp):
    from torchtune_prefopt.modules.sequence_logprobs import SequenceLogProbs

    return SequenceLogProbs(lp.sum.double().cpu(), lp.mean.double().cpu(), lp.num_tokens.cpu())


class HeldoutEvaluator:
    """One held-out set, one reference model; evaluates any number of policies identically."""

    def __init__(
        self,
        tokenizer,
        items: Sequence[Dict[str, Any]],
        reference: nn.Module,
        settings: EvalSettings,
        device: torch.device,
        dtype: torch.dtype,
        judge: Optional[Callable] = None,
        judge_kind: Optional[str] = None,
        gold_reward: Optional[Callable] = None,
    ):
        if settings.max_rows is not None:
            items = list(items)[: settings.max_rows]
        if not items:
            raise ValueError("the held-out set is empty")
        self.tokenizer = tokenizer
        self.items = list(items)
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self.judge = judge
        self.judge_kind = judge_kind
        self.gold_reward = gold_reward
        self.pad_id = int(getattr(tokenizer, "pad_id", 0) or 0)
        self.stop_tokens = list(getattr(tokenizer, "stop_tokens", None) or [tokenizer.eos_id])
        self.reference = reference
        # one generation prompt per distinct prompt (held-out rows may share prompts)
        seen: Dict[tuple, int] = {}
        self.prompts: List[List[int]] = []
        for it in self.items:
            p = tuple(prompt_ids(it))
            if p not in seen:
                seen[p] = len(self.prompts)
                self.prompts.append(list(p))
        self.prompt_texts = [self._text(p) for p in self.prompts]
        self.reference_logps = self.heldout_logps(reference)
        self.reference_completions = self.generate(reference)

    # ------------------------------------------------------------------ pieces
    def _text(self, ids: Sequence[int]) -> str:
        return decode_completion(self.tokenizer, ids, self.stop_tokens)

    @torch.no_grad()
    def heldout_logps(self, model: nn.Module) -> HeldoutLogps:
        parts = []
        bs = self.settings.batch_size
        for start in range(0, len(self.items), bs):
            batch = PairedBatch.collate(self.items[start : start + bs], pad_id=self.pad_id).to(
                self.device
            )
            c, r = batch.logps(model, self.settings.chunk_size).halves()
            parts.append(HeldoutLogps(*(_float64_cpu(x) for x in (c, r))))
        return HeldoutLogps.cat(parts)

    def generate(
        self, model: nn.Module, *, sample: bool = False, repeats: int = 1
    ) -> List[List[int]]:
        s = self.settings
        prompts = [p for p in self.prompts for _ in range(repeats)]
        return generate_completions(
            model,
            prompts,
            max_new_tokens=s.kl_max_new_tokens if sample else s.max_new_tokens,
            stop_tokens=self.stop_tokens,
            pad_id=self.pad_id,
            device=self.device,
            dtype=self.dtype,
            temperature=1.0 if sample else s.temperature,
            top_k=None if sample else s.top_k,
            seed=s.kl_seed if sample else s.generation_seed,
            batch_size=s.generation_batch_size,
            kv_cache=s.kv_cache,
        )

    def kl(self, policy: nn.Module) -> Dict[str, Any]:
        """Samples ``y ~ policy`` (temperature 1, ``kl_samples_per_prompt`` per prompt, the
        same seed for every model) and what they measure: the Monte-Carlo KL to the
        reference, their length and, with a gold reward, its mean (the frontier's point).
        ``policy`` may be the reference itself (KL exactly 0)."""
        s = self.settings
        if s.kl_samples_per_prompt < 1:
            return {}
        samples = self.generate(policy, sample=True, repeats=s.kl_samples_per_prompt)
        prompts = [p for p in self.prompts for _ in range(s.kl_samples_per_prompt)]
        index = torch.tensor(
            [i for i in range(len(self.prompts)) for _ in range(s.kl_samples_per_prompt)]
        )
        kw = dict(
            pad_id=self.pad_id,
            device=self.device,
            batch_size=s.batch_size * 2,
            chunk_size=s.chunk_size,
        )
        lp_pol = completion_logps(policy, prompts, samples, **kw)
        lp_ref = (
            lp_pol
            if policy is self.reference
            else completion_logps(self.reference, prompts, samples, **kw)
        )
        out = kl_estimate(lp_pol, lp_ref, index)
        out["kl_max_new_tokens"] = float(s.kl_max_new_tokens)
        lengths, _ = completion_lengths(samples, self.stop_tokens)
        out["sample_length"], out["sample_length_stderr"], _ = prompt_mean(
            torch.tensor(lengths, dtype=torch.float64), index
        )
        texts = [self._text(c) for c in samples]
        gold = None
        if self.gold_reward is not None:
            gold = score_responses(
                self.gold_reward, [self.prompt_texts[i] for i in index.tolist()], texts
            )
            out["gold_reward"], out["gold_reward_stderr"], _ = prompt_mean(
                torch.tensor(gold, dtype=torch.float64), index
            )
        out["rows"] = [
            {
                "prompt": int(i),
                "sample": t,
                "ids": [int(x) for x in c],
                "tokens": len(c),
                "length": n,
                "logp": float(a),
                "logp_ref": float(b),
                **({} if gold is None else {"gold": gold[k]}),
            }
            for k, (i, c, t, n, a, b) in enumerate(
                zip(index.tolist(), samples, texts, lengths, lp_pol.tolist(), lp_ref.tolist())
            )
        ]
        return out

    # ------------------------------------------------------------------ all of it
    def evaluate(self, policy: Optional[nn.Module], loss_fn=None) -> Dict[str, Any]:
        """All measurements for ``policy`` (``None``: the reference itself)."""
        is_ref = policy is None
        model = self.reference if is_ref else policy
        logps = self.reference_logps if is_ref else self.heldout_logps(model)
        result: Dict[str, Any] = {
            "heldout": heldout_metrics(
                None if is_ref else loss_fn, logps, None if is_ref else self.reference_logps
            )
        }
        completions = self.reference_completions if is_ref else self.generate(model)
        lengths, hit = completion_lengths(completions, self.stop_tokens)
        ref_lengths, _ = completion_lengths(self.reference_completions, self.stop_tokens)
        mean_len = sum(lengths) / len(lengths)
        ref_len = sum(ref_lengths) / len(ref_lengths)
        responses = [self._text(c) for c in completions]
        ref_responses = [self._text(c) for c in self.reference_completions]
        gen = {
            "response_length": mean_len,
            "length_ratio": mean_len / ref_len if ref_len > 0 else float("nan"),
            "hit_max_new_tokens": sum(hit) / len(hit),
            "prompts": float(len(self.prompts)),
        }
        judge = None
        if self.judge is not None and not is_ref:
            judge = judge_win_rate(
                self.judge, self.judge_kind, self.prompt_texts, responses, ref_responses
            )
            gen["win_rate"] = judge["win_rate"]
            if "mean_score" in judge:
                gen["judge_mean_score"] = judge["mean_score"]
                gen["judge_reference_mean_score"] = judge["reference_mean_score"]
        elif self.judge is not None and self.judge_kind == "reward":
            gen["judge_mean_score"] = sum(
                self.judge(x, r) for x, r in zip(self.prompt_texts, ref_responses)
            ) / len(ref_responses)
        result["generation"] = gen
        # the reference is sampled too when a gold reward is set: the frontier's KL-0 point
        kl = self.kl(model) if not is_ref or self.gold_reward is not None else {}
        kl_rows = kl.pop("rows", [])
        result["kl"] = kl
        result["rows"] = {
            "heldout": logps.to_rows(),
            "generations": [
                {
                    "prompt": x,
                    "response": r,
                    "response_tokens": n,
                    "hit_max_new_tokens": h,
                    **({} if is_ref else {"reference_response": rr}),
                    **({"judge_p": judge["per_prompt"][i]} if judge else {}),
                }
                for i, (x, r, n, h, rr) in enumerate(
                    zip(self.prompt_texts, responses, lengths, hit, ref_responses)
                )
            ],
            "kl_samples": kl_rows,
        }
        return result
