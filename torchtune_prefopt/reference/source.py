"""Where a run's reference log-probs come from: one object per strategy, one interface.

The recipe picks a :class:`ReferenceSource` at set-up and then only calls

* :meth:`ReferenceSource.logps` ``(batch)``: the reference log-probs of a batch's ``2B``
  sequences in the batch layout every batch shares (padded or packed): chosen then rejected
  for pairs, KTO's rows then their mismatched KL rows for unpaired data; or ``None`` for a
  reference-free loss.

Strategies:

==========================  =========================================================
:class:`NoReference`        reference-free losses (SimPO): nothing is loaded or run
:class:`FrozenModel`        a frozen copy of the base weights (FSDP2-sharded), or its
                            torchao-quantized replica (``reference.quantization``)
:class:`AdaptersDisabled`   LoRA: the policy itself with its adapters switched off
:class:`PrecomputedReference`        ``reference.precompute``: log-probs computed once, looked
                            up by dataset position (the model is freed)
==========================  =========================================================

All log-probs come out of :func:`~torchtune_prefopt.modules.decoder_sequence_logprobs` under
``torch.no_grad`` (the cache was filled the same way), so the strategies give the same numbers
for the same weights.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator, Optional

import torch
from torch import nn
from torchtune.modules.peft import disable_adapter

from torchtune_prefopt.data import PreferenceBatch
from torchtune_prefopt.modules import SequenceLogProbs
from torchtune_prefopt.reference.precompute import (
    PrecomputeJob,
    ReferenceLogpsTable,
    precompute_reference_logps,
)
from torchtune_prefopt.reference.store import ReferenceCacheFile, load_or_compute

__all__ = [
    "AdaptersDisabled",
    "PrecomputedReference",
    "FrozenModel",
    "NoReference",
    "ReferenceSource",
]


class ReferenceSource:
    """The reference log-probs of a run (see the module docstring)."""

    #: a frozen reference model held by this source (for inspection and freeing), if any
    model: Optional[nn.Module] = None

    def logps(self, batch: PreferenceBatch) -> Optional[SequenceLogProbs]:
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the log: what the reference is."""
        raise NotImplementedError


class NoReference(ReferenceSource):
    """Reference-free losses: no reference model, no reference forward."""

    def __init__(self, loss_name: str):
        self.loss_name = loss_name

    def logps(self, batch: PreferenceBatch) -> None:
        return None

    def describe(self) -> str:
        return f"none ({self.loss_name} is reference-free)"


class _ModelReference(ReferenceSource):
    """Runs a model under ``torch.no_grad`` on the batch's sequences."""

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size

    def using_model(self) -> ContextManager[nn.Module]:
        """A context manager yielding the reference model to run."""
        raise NotImplementedError

    def logps(self, batch: PreferenceBatch) -> SequenceLogProbs:
        with torch.no_grad(), self.using_model() as model:
            return batch.logps(model, self.chunk_size)


class FrozenModel(_ModelReference):
    """A frozen reference model (sharded like the policy, or a quantized replica)."""

    def __init__(self, model: nn.Module, source: str, chunk_size: int):
        super().__init__(chunk_size)
        self.model = model
        self.source = source

    def using_model(self) -> ContextManager[nn.Module]:
        return nullcontext(self.model)

    def describe(self) -> str:
        return f"frozen copy of {self.source}"


class AdaptersDisabled(_ModelReference):
    """LoRA: the reference is the policy's own base weights (adapters switched off)."""

    def __init__(self, policy: nn.Module, chunk_size: int):
        super().__init__(chunk_size)
        self.policy = policy

    @contextmanager
    def using_model(self) -> Iterator[nn.Module]:
        with disable_adapter(self.policy):
            yield self.policy

    def describe(self) -> str:
        return "the policy with its LoRA adapters disabled (no second copy)"


class PrecomputedReference(ReferenceSource):
    """Precomputed reference log-probs, looked up by the batch's dataset positions.

    Each lookup is checked against the batch: the cached rows must score as many tokens as
    the batch's rows (a cheap guard against a cache of other data).
    """

    def __init__(self, cache: ReferenceLogpsTable, what: str):
        self.cache = cache
        self.what = what

    @classmethod
    def precompute(
        cls, live: "_ModelReference", store: Optional[ReferenceCacheFile], job: PrecomputeJob
    ) -> "PrecomputedReference":
        """Load ``job.dataset``'s reference log-probs from ``store`` (rank 0 reads it; ``None``
        on the other ranks), or compute them with ``live``'s model (collective) and save them.
        See :func:`~torchtune_prefopt.reference.store.load_or_compute`."""

        def compute():
            with live.using_model() as model:
                return precompute_reference_logps(model, job, chunk_size=live.chunk_size)

        data = load_or_compute(
            store, compute, rank=job.rank, world_size=job.world_size, device=job.device
        )
        return cls(ReferenceLogpsTable(data), job.what)

    @staticmethod
    def _checked(lp: SequenceLogProbs, counts: torch.Tensor) -> SequenceLogProbs:
        if not torch.equal(lp.num_tokens, counts.to(lp.num_tokens.device)):
            raise RuntimeError(
                "cached reference log-probs do not match this batch's rows (token counts differ)"
            )
        return lp

    def logps(self, batch: PreferenceBatch) -> SequenceLogProbs:
        counts = batch.label_counts()
        if self.cache.paired:
            lp = self.cache.pairs(batch.index, device=counts.device)
        else:
            lp = SequenceLogProbs.cat(
                self.cache.rows(batch.index, device=counts.device),
                self.cache.kl(batch.index, batch.kl_completion_index, device=counts.device),
            )
        return self._checked(lp, counts)

    def describe(self) -> str:
        return f"cached log-probs of {self.what}"
