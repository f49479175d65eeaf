"""Materialising a torchtune model from its config node and a full state dict: the one place
the policy and the frozen reference are built.

:func:`build_model` instantiates the builder on the ``meta`` device, checks the state dict
against it (names and shapes: one line naming the weight and the checkpoint), compiles the
decoder layers, adds activation checkpointing, shards with FSDP2, initialises RoPE on the
device, loads the weights and disables dropout. A frozen model (the reference) gets no
gradients and is put in eval mode. :func:`is_lora_model` and :func:`context_length` are the
one owners of "is this a LoRA model" and "how long is its context".
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import nn

from torchtune_prefopt.errors import PrefOptUserError

__all__ = [
    "ModelPlacement",
    "build_model",
    "check_state_dict",
    "context_length",
    "init_rope",
    "is_lora_model",
    "meta_model",
    "shards_model",
    "vocab_size",
]


@dataclass(frozen=True)
class ModelPlacement:
    """Where and how a model runs (the recipe's ``device``, ``dtype``, ``compile``,
    ``enable_activation_checkpointing`` and FSDP2 keys).

    ``shard``: wrap the model in FSDP2 (:func:`shards_model` decides it from the world size);
    ``False``: a plain module whose weights live on ``device`` as they are, so no step pays for
    FSDP2's all-gathers, reduce-scatters and the unsharded copies of the weights.
    """

    device: torch.device
    dtype: torch.dtype
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp_cpu_offload: bool = False
    fsdp_reshard_after_forward: bool = True
    custom_sharded_layers: Optional[Any] = None
    shard: bool = True


def shards_model(world_size: int, fsdp_cpu_offload: bool) -> bool:
    """Whether the recipe wraps its models in FSDP2: on several processes (the weights,
    gradients and optimizer state are split over them), or when the parameters are to live on
    the CPU (``fsdp_cpu_offload``: an FSDP2 feature). One process without offload holds every
    weight anyway: FSDP2 would only copy them (an all-gather per layer in forward and again in
    backward, a reduce-scatter per gradient) and keep a second, unsharded copy. The numerics are
    the same either way (a one-process all-gather / reduce-scatter is a copy)."""
    return world_size > 1 or bool(fsdp_cpu_offload)


def meta_model(model_cfg: Any, dtype: torch.dtype) -> nn.Module:
    """The builder's model on the ``meta`` device (no memory): cheap to ask what it is. A
    builder whose model is not a torchtune decoder (the recipe computes log-probs through
    ``tok_embeddings`` ... ``norm`` -> ``output``) is one line."""
    from torchtune import config, training

    with training.set_default_dtype(dtype), torch.device("meta"):
        model = config.instantiate(model_cfg)
    missing = [
        a
        for a in ("tok_embeddings", "layers", "norm", "output", "unembed")
        if not hasattr(model, a)
    ]
    if missing:
        target = model_cfg.get("_component_", "?") if hasattr(model_cfg, "get") else "?"
        raise PrefOptUserError(
            f"model: {target} builds a {type(model).__name__}, not a torchtune "
            f"TransformerDecoder (no {missing[0]}); for a Hugging Face folder use "
            "torchtune_prefopt.models.hf.hf_decoder with model_dir=<folder>"
        )
    return model


def is_lora_model(model: nn.Module) -> bool:
    """True for a model with LoRA/DoRA adapters (a ``lora_*`` builder)."""
    from torchtune.modules.peft import get_adapter_params

    return bool(get_adapter_params(model))


def context_length(model: nn.Module) -> Optional[int]:
    """The model's context (``max_seq_len``), or ``None`` if it does not say."""
    return getattr(model, "max_seq_len", None)


def vocab_size(model: nn.Module) -> Optional[int]:
    """Rows of the model's token embedding (``None`` if it has no ``tok_embeddings``)."""
    emb = getattr(model, "tok_embeddings", None)
    return getattr(emb, "num_embeddings", None)


def check_state_dict(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    source: Any,
    strict_keys: bool = True,
    weight_name: Optional[Callable[[str], str]] = None,
) -> None:
    """Compare a full state dict with ``model``'s parameter shapes (and, with ``strict_keys``,
    its names) before loading it: a mismatch is one line naming the weight and ``source``.
    ``weight_name`` gives a weight the name the user's files use (``HFCheckpoint.weight_name``:
    ``model.layers.0.mlp.up_proj.weight`` rather than torchtune's ``layers.0.mlp.w3.weight``)."""
    name = weight_name or (lambda k: k)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, v in sd.items():
        if k in expected and tuple(v.shape) != expected[k]:
            raise PrefOptUserError(
                f"checkpoint {source}: weight '{name(k)}' has shape {tuple(v.shape)}, the model "
                f"built from the config expects {expected[k]}"
            )
    if strict_keys:
        missing = [k for k in expected if k not in sd]
        if missing:
            raise PrefOptUserError(
                f"checkpoint {source}: missing weight '{name(missing[0])}' ({len(missing)} missing)"
            )
        unexpected = [k for k in sd if k not in expected]
        if unexpected:
            raise PrefOptUserError(
                f"checkpoint {source}: weight '{name(unexpected[0])}' is not in the model "
                f"({len(unexpected)} such weights): the checkpoint is of another model than "
                "the config's model builder (layers, sizes)"
            )


def init_rope(model: nn.Module, placement: ModelPlacement) -> None:
    """RoPE caches are buffers built on the device (a meta model has none yet)."""
    from torchtune import training

    with training.set_default_dtype(placement.dtype), placement.device:
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()


def _shard(model: nn.Module, placement: ModelPlacement) -> None:
    from torchtune import training

    training.shard_model(
        model=model,
        shard_conditions=[
            partial(training.get_shard_conditions, names_to_match=placement.custom_sharded_layers)
        ],
        cpu_offload=placement.fsdp_cpu_offload,
        reshard_after_forward=placement.fsdp_reshard_after_forward,
    )


def build_model(
    model_cfg: Any,
    state_dict: Dict[str, torch.Tensor],
    placement: ModelPlacement,
    *,
    source: Any,
    trainable: bool,
    verbose: bool = False,
    weight_name: Optional[Callable[[str], str]] = None,
) -> nn.Module:
    """A model (FSDP2-sharded if ``placement.shard``) with ``state_dict``'s weights (checked
    against the builder first).

    Args:
        model_cfg: the ``model`` config node (a torchtune builder).
        state_dict: full (unsharded) weights in torchtune names, adapters included for LoRA.
        placement: device, dtype, compile and FSDP2 settings.
        source: what the weights are, for error messages (a checkpoint directory).
        trainable: the policy (LoRA: only the adapters train; activation checkpointing
            applies); ``False``: a frozen reference (no gradients, eval mode).
        verbose: let ``torch.compile`` log (rank 0 of the policy).
        weight_name: the user's name of a weight, for messages (:func:`check_state_dict`).
    """
    from torchtune import modules, training
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    model = meta_model(model_cfg, placement.dtype)
    adapters = get_adapter_params(model)
    if trainable and adapters:
        set_trainable_params(model, adapters)
    check_state_dict(model, state_dict, source, strict_keys=True, weight_name=weight_name)
    if placement.compile:
        training.compile_model(model, verbose=verbose)
    if trainable and placement.activation_checkpointing:
        training.set_activation_checkpointing(
            model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
        )
    if placement.shard:
        _shard(model, placement)
        init_rope(model, placement)
        training.load_from_full_model_state_dict(
            model, state_dict, placement.device, strict=True, cpu_offload=placement.fsdp_cpu_offload
        )
    else:
        model.to_empty(device=placement.device)  # uninitialised, in the builder's dtype
        init_rope(model, placement)
        model.load_state_dict(state_dict, strict=True)  # copies (and casts) every weight
    training.validate_no_params_on_meta_device(model)
    training.disable_dropout(model)
    if not trainable:
        for p in model.parameters():
            p.requires_grad = False
        model.eval()
    return model
