"""Deciding and building a run's reference, once.

:func:`plan_reference` decides, before any weights load, what the reference is (none, the
policy with its adapters disabled, a frozen copy, a quantized replica) and which of the
user's reference settings are ignored (said once, as warnings); :class:`ReferencePlan` then
holds the one effective quantization mode that both the model and the cache fingerprint use.
:func:`build_reference` returns the :class:`~torchtune_prefopt.reference.source.ReferenceSource`
of the plan, and :func:`precompute_reference` turns a live source into cached log-probs
(``reference.precompute``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from torchtune_prefopt.losses import loss_traits
from torchtune_prefopt.models.build import (
    ModelPlacement,
    build_model,
    check_state_dict,
    init_rope,
    meta_model,
)
from torchtune_prefopt.models.hf_checkpoint import HFCheckpoint
from torchtune_prefopt.reference.fingerprint import machine_digest_memo, reference_fingerprint
from torchtune_prefopt.reference.precompute import PrecomputeJob
from torchtune_prefopt.reference.quantize import quantize_reference
from torchtune_prefopt.reference.source import (
    AdaptersDisabled,
    FrozenModel,
    NoReference,
    PrecomputedReference,
    ReferenceSource,
)
from torchtune_prefopt.reference.store import ReferenceCacheFile

__all__ = ["ReferencePlan", "build_reference", "plan_reference", "precompute_reference"]


@dataclass(frozen=True)
class ReferencePlan:
    """What a run's reference is.

    Attributes:
        mode: ``none`` (reference-free loss), ``adapters_disabled`` (LoRA), ``frozen`` (a
            sharded frozen copy) or ``quantized`` (a torchao replica).
        quantization: the effective ``reference.quantization`` (``None`` unless ``quantized``).
        precompute: the effective ``reference.precompute``.
        own_checkpoint: the reference loads ``ref_checkpointer`` (else the base weights).
        warnings: what of the user's settings is ignored, and why.
    """

    mode: str
    quantization: Optional[str] = None
    precompute: bool = False
    own_checkpoint: bool = False
    warnings: Tuple[str, ...] = field(default_factory=tuple)


def plan_reference(
    loss: Any,
    *,
    lora: bool,
    quantization: Optional[str],
    precompute: bool,
    ref_checkpointer: bool,
) -> ReferencePlan:
    """The reference of a run with this loss (its ``reference_free`` flag), model kind and
    ``reference.*`` / ``ref_checkpointer`` settings."""
    name = type(loss).__name__
    if loss_traits(loss).reference_free:
        ignored = [
            key
            for key, on in (
                ("ref_checkpointer", ref_checkpointer),
                ("reference.quantization", quantization is not None),
                ("reference.precompute", precompute),
            )
            if on
        ]
        warnings = (
            (
                f"{name} is reference-free: {', '.join(ignored)} ignored and no reference model is loaded.",
            )
            if ignored
            else ()
        )
        return ReferencePlan("none", warnings=warnings)
    if lora:
        warnings = []
        if ref_checkpointer:
            warnings.append(
                "ref_checkpointer is ignored with a LoRA model: the reference is the policy's "
                "own base weights with the adapters disabled (use a full model for another reference)"
            )
        if quantization is not None:
            warnings.append(
                "reference.quantization is ignored with LoRA (the reference is the policy's own base weights)"
            )
        return ReferencePlan("adapters_disabled", precompute=precompute, warnings=tuple(warnings))
    return ReferencePlan(
        "quantized" if quantization is not None else "frozen",
        quantization=quantization,
        precompute=precompute,
        own_checkpoint=ref_checkpointer,
    )


def build_reference(
    plan: ReferencePlan,
    *,
    loss_name: str,
    policy: torch.nn.Module,
    base: HFCheckpoint,
    base_sd: Dict[str, torch.Tensor],
    ref_checkpointer: Optional[HFCheckpoint],
    model_cfg: Any,
    placement: ModelPlacement,
    chunk_size: int,
    log: Any = None,
) -> Tuple[ReferenceSource, List[Path]]:
    """The plan's live reference, and the files whose bytes are its weights (for the cache
    fingerprint).

    Args:
        plan: from :func:`plan_reference`.
        loss_name: for the reference-free source's description.
        policy: the built policy (LoRA: it is the reference, adapters off).
        base, base_sd: the base checkpoint and its weights (the default reference).
        ref_checkpointer: the ``ref_checkpointer`` checkpoint (used if ``plan.own_checkpoint``).
        model_cfg, placement: how to build the frozen copy (like the policy).
        chunk_size: log-prob chunk size.
        log: a callable taking one line (quantization report).
    """
    files = base.content_files()
    if plan.mode == "none":
        return NoReference(loss_name), files
    if plan.mode == "adapters_disabled":
        return AdaptersDisabled(policy, chunk_size), files
    sd, source, names = base_sd, base.checkpoint_dir, base.weight_name
    if plan.own_checkpoint:
        ref = ref_checkpointer
        sd, source, files = ref.load(), ref.checkpoint_dir, ref.content_files()
        names = ref.weight_name
    if plan.mode == "quantized":
        model = _quantized_replica(model_cfg, sd, source, placement, plan.quantization, log, names)
    else:
        model = build_model(
            model_cfg, sd, placement, source=source, trainable=False, weight_name=names
        )
    return FrozenModel(model, str(source), chunk_size), files


def _quantized_replica(
    model_cfg: Any,
    sd: Dict[str, torch.Tensor],
    source: Any,
    placement: ModelPlacement,
    mode: str,
    log: Any,
    weight_name: Any = None,
) -> torch.nn.Module:
    """torchao's quantized tensors do not compose with FSDP2: a plain module, replicated on
    every rank. Weights stay on the CPU until each layer is quantized on the device."""
    from torchtune import training

    model = meta_model(model_cfg, placement.dtype)
    check_state_dict(model, sd, source, strict_keys=True, weight_name=weight_name)
    model.load_state_dict(
        {k: v.to(placement.dtype) for k, v in sd.items()}, strict=True, assign=True
    )
    init_rope(model, placement)
    report = quantize_reference(model, mode, device=placement.device)
    training.validate_no_params_on_meta_device(model)
    training.disable_dropout(model)
    if log is not None:
        log(report.summary())
    return model


def precompute_reference(
    live: ReferenceSource,
    jobs: Mapping[str, Tuple[PrecomputeJob, Path]],
    *,
    plan: ReferencePlan,
    weight_files: List[Path],
    tokenizer: Any,
    settings: Mapping[str, Any],
    log: Any = None,
) -> Dict[str, PrecomputedReference]:
    """``reference.precompute``: each job's reference log-probs, computed once with ``live``
    (collective) or loaded from the cache in its directory when the fingerprint matches;
    the live model is then freed.

    Args:
        live: the run's model reference (:func:`build_reference`).
        jobs: ``{name: (job, cache directory)}`` (training rows, held-out rows).
        plan: the reference plan (its quantization enters the fingerprint).
        weight_files: the reference's weight files (:func:`build_reference`).
        tokenizer: the run's tokenizer (its files and ``max_seq_len``).
        settings: what else changes the numbers (``model`` config, ``dtype``, ``lora``).
    Returns:
        ``{name: source}``.
    """
    out = {}
    for name, (job, cache_dir) in jobs.items():
        store = None
        if job.rank == 0:  # only rank 0 reads/writes the file: only it needs the fingerprint
            fingerprint = reference_fingerprint(
                weight_files,
                job.dataset,
                tokenizer,
                tokenizer.max_seq_len,
                extra={**settings, "kl_pairs": job.kl_pairs},
                quantization=plan.quantization,
                digest_memo=machine_digest_memo(),  # the one memo, shared with the identity
            )
            store = ReferenceCacheFile(cache_dir, fingerprint)
        out[name] = PrecomputedReference.precompute(live, store, job)
    if live.model is not None:
        live.model = None  # not needed any more: free its memory
        if log is not None:
            log("reference model freed: training and evaluation use the cached reference log-probs")
    return out
