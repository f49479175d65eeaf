"""Per-sequence log-probs straight out of a torchtune ``TransformerDecoder``.

Under FSDP2 the root module's own parameters (``tok_embeddings``, ``norm``, ``output``) are
unsharded only *inside* the root's forward, so the vocabulary projection has to happen
inside ``model(...)``. :func:`enable_sequence_logprobs` therefore overrides the *instance's*
``unembed`` (``TransformerDecoder.forward`` ends with ``self.unembed(h)``, which applies
``self.norm`` then ``self.output``): while :func:`decoder_sequence_logprobs` has handed in
labels for the current call, ``unembed`` returns the ``[B]`` per-sequence log-prob sums
computed by :func:`~torchtune_prefopt.modules.sequence_logprobs` with ``self.output`` as
the projection; otherwise it is the class's own ``unembed``, untouched.

The override is an instance attribute, so it survives ``fully_shard`` (which swaps the
module's class), adds no parameters or buffers (``state_dict`` keys are unchanged), and
works with LoRA models, tied embeddings (``TiedLinear``), activation checkpointing and
per-layer ``torch.compile``.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from torchtune_prefopt.modules.sequence_logprobs import (
    SequenceLogProbs,
    TokenSelection,
    selected_logprobs,
)

__all__ = ["decoder_sequence_logprobs", "enable_sequence_logprobs"]

_ENABLED = "_prefopt_seq_logprobs_enabled"
_REQUEST = "_prefopt_seq_logprobs_request"
_PREVIOUS = "_prefopt_seq_logprobs_previous_unembed"


class _Request:
    __slots__ = ("selection", "chunk_size", "served")

    def __init__(self, selection: TokenSelection, chunk_size: int) -> None:
        self.selection = selection
        self.chunk_size = chunk_size
        self.served = False


class _Unembed:
    """Instance-level ``unembed`` (a callable object, not a bound method, so the model
    still deep-copies and pickles: the copy's override points at the copy)."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, h: Tensor) -> Tensor:
        return _unembed(self.module, h)


def _unembed(self: nn.Module, h: Tensor) -> Tensor:
    request: Optional[_Request] = self.__dict__.get(_REQUEST)
    if request is None:
        # exactly the original behaviour: an earlier instance override if there was one,
        # else the class's method (whatever class FSDP2 has swapped in)
        previous = self.__dict__.get(_PREVIOUS)
        return previous(h) if previous is not None else type(self).unembed(self, h)
    request.served = True
    h = self.norm(h)
    out = selected_logprobs(h, self.output, request.selection, chunk_size=request.chunk_size)
    return out.sum


def enable_sequence_logprobs(model: nn.Module) -> nn.Module:
    """Install the log-prob ``unembed`` override on ``model`` (idempotent); returns ``model``.

    ``model`` must look like a torchtune ``TransformerDecoder``: an ``unembed`` method whose
    forward path calls it, and ``norm`` and ``output`` attributes. Call it before or after
    ``fully_shard``/``shard_model``, activation checkpointing or compiling the layers.
    """
    if model.__dict__.get(_ENABLED, False):
        return model
    missing = [a for a in ("unembed", "norm", "output") if not hasattr(model, a)]
    if missing:
        raise TypeError(
            f"{type(model).__name__} is not a torchtune TransformerDecoder-like model "
            f"(missing {missing})"
        )
    # plain instance attributes (not submodules/params/buffers): state_dict is unchanged
    model.__dict__[_PREVIOUS] = model.__dict__.get("unembed")
    model.__dict__["unembed"] = _Unembed(model)
    model.__dict__[_ENABLED] = True
    return model


def decoder_sequence_logprobs(
    model: nn.Module,
    tokens: Tensor,
    labels: Optional[Tensor] = None,
    *,
    selection: Optional[TokenSelection] = None,
    chunk_size: int = 1024,
    mask: Optional[Any] = None,
    input_pos: Optional[Tensor] = None,
) -> SequenceLogProbs:
    """Run ``model(tokens, mask=mask, input_pos=input_pos)`` and return per-sequence log-probs.

    Same numbers as ``rlhf.get_batch_log_probs(model(tokens), labels)`` (sum; ``mean`` is the
    ``return_average_logprobs=True`` variant), but the ``[B, S, V]`` logits never exist: only
    positions with a label are projected, ``chunk_size`` tokens at a time, in fp32.

    Args:
        model: torchtune ``TransformerDecoder`` (plain, LoRA, tied/untied output, FSDP2-sharded,
            activation-checkpointed, per-layer compiled). :func:`enable_sequence_logprobs` is
            applied to it on first use.
        tokens: ``[B, S]`` input ids (padded rows, or packed rows).
        labels: ``[B, S]`` *unshifted* labels, ``-100`` on prompt and padding (padded rows).
        selection: instead of ``labels``: which positions score which tokens for which
            sequence (:class:`~torchtune_prefopt.modules.TokenSelection`; packed rows).
        chunk_size: label tokens projected at once.
        mask, input_pos: forwarded to the model (packed sequences, custom masks).

    Raises:
        ValueError: bad shapes, or a row without label tokens (raised before the forward).
    """
    if (labels is None) == (selection is None):
        raise ValueError("decoder_sequence_logprobs takes exactly one of labels and selection")
    if tokens.dim() != 2 or (labels is not None and labels.shape != tokens.shape):
        shape = None if labels is None else tuple(labels.shape)
        raise ValueError(
            f"tokens {tuple(tokens.shape)} and labels {shape} must both be [batch, seq]"
        )
    if selection is None:
        selection = TokenSelection.from_labels(labels)  # fails before running the model
    enable_sequence_logprobs(model)

    request = _Request(selection, chunk_size)
    if model.__dict__.get(_REQUEST) is not None:
        raise RuntimeError("decoder_sequence_logprobs is already running on this model")
    model.__dict__[_REQUEST] = request
    try:
        out = model(tokens, mask=mask, input_pos=input_pos)
    finally:
        model.__dict__.pop(_REQUEST, None)
    if not request.served:
        raise RuntimeError(
            f"{type(model).__name__}.forward did not call self.unembed(h); "
            "decoder_sequence_logprobs needs a torchtune TransformerDecoder"
        )
    if isinstance(out, (list, tuple)):  # output_hidden_states: [*hidden, output]
        out = out[-1]
    total = out
    num_tokens = selection.num_tokens
    mean = total / num_tokens.to(total.dtype)
    return SequenceLogProbs(sum=total, mean=mean, num_tokens=num_tokens)
