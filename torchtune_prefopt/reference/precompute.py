"""Reference log-probs computed once: the precompute pass and the lookup by dataset position.

The reference model is frozen, so its log-probs of every training sequence are fixed. For a
run with several epochs, or runs repeated with other hyperparameters, they can be computed
once (:func:`precompute_reference_logps`), stored
(:class:`~torchtune_prefopt.reference.store.ReferenceCacheFile`) and looked up by dataset
position (:class:`ReferenceLogpsTable`) instead of running the reference forward every step;
the reference model then need not be kept in memory during training.

KTO's KL rows depend on which rows share a global micro-batch
(:func:`~torchtune_prefopt.data.kl_partner`): :func:`kto_kl_pairs` replays the recipe's
:class:`~torchtune_prefopt.training.data_order.GlobalBatchSampler` (a deterministic function of
seed, epoch and global batch size) to list every pair a run will use.

Sharding of the precompute: the rows are cut into fixed batches of ``batch_size`` (in
position order, independent of the number of processes) and batch ``k`` runs on rank
``k mod world_size``; the per-row results are then assembled on every rank with one
``all_reduce`` (each position is filled by exactly one rank, the others contribute exact
zeros). Because a batch's content, padding and shape do not depend on the world size, the
result is bitwise the same on 1 or N processes (given the same device and kernels). The
precompute always uses the padded layout, so a cache does not depend on how training lays out
its batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from torchtune_prefopt.data import PreferenceBatch, completion_labels, is_paired_row, kl_partner
from torchtune_prefopt.modules import SequenceLogProbs
from torchtune_prefopt.reference.fingerprint import log

__all__ = [
    "PrecomputeJob",
    "ReferenceLogpsTable",
    "kto_kl_pairs",
    "precompute_reference_logps",
]


class ReferenceLogpsTable:
    """Look up cached reference log-probs by dataset position, in the recipe's layouts."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        self.t = dict(tensors)
        self.paired = "chosen_sum" in self.t
        self._kl: Dict[Tuple[int, int], int] = {}
        if "kl_pairs" in self.t:
            for k, (i, j) in enumerate(self.t["kl_pairs"].tolist()):
                self._kl[(i, j)] = k

    def __len__(self) -> int:
        return int(self.t["chosen_sum" if self.paired else "sum"].shape[0])

    @staticmethod
    def _seq(s: Tensor, m: Tensor, n: Tensor, device) -> SequenceLogProbs:
        return SequenceLogProbs(sum=s.to(device), mean=m.to(device), num_tokens=n.to(device))

    def pairs(self, index: Tensor, device=None) -> SequenceLogProbs:
        """``[2B]`` log-probs of pairs ``index``, in :class:`~torchtune_prefopt.data.PairedBatch`'s
        layout (chosen rows then rejected rows)."""
        idx = torch.as_tensor(index, dtype=torch.long).cpu()
        t = self.t

        def both(field: str) -> Tensor:
            return torch.cat([t[f"chosen_{field}"][idx], t[f"rejected_{field}"][idx]])

        return self._seq(both("sum"), both("mean"), both("num_tokens"), device)

    def rows(self, index: Tensor, device=None) -> SequenceLogProbs:
        """``[B]`` KTO row log-probs."""
        idx = torch.as_tensor(index, dtype=torch.long).cpu()
        return self._seq(self.t["sum"][idx], self.t["mean"][idx], self.t["num_tokens"][idx], device)

    def logps(self, index: Tensor, device=None) -> SequenceLogProbs:
        """The rows ``index`` of a batch: :meth:`pairs` for a paired cache, :meth:`rows` for KTO."""
        return self.pairs(index, device) if self.paired else self.rows(index, device)

    def kl(self, prompt_index: Tensor, completion_index: Tensor, device=None) -> SequenceLogProbs:
        """``[B]`` KL-row log-probs of (prompt row, completion row) pairs."""
        ks = []
        for i, j in zip(
            torch.as_tensor(prompt_index).tolist(), torch.as_tensor(completion_index).tolist()
        ):
            k = self._kl.get((i, j))
            if k is None:
                raise KeyError(
                    f"KL pair (prompt row {i}, completion row {j}) is not in the reference cache: it "
                    "was precomputed for another data order (seed, batch size, epochs)"
                )
            ks.append(k)
        k = torch.tensor(ks, dtype=torch.long)
        return self._seq(
            self.t["kl_sum"][k], self.t["kl_mean"][k], self.t["kl_num_tokens"][k], device
        )


def kto_kl_pairs(
    sampler, epochs: Union[int, Iterable[int]], max_batches_per_epoch: Optional[int] = None
) -> List[Tuple[int, int]]:
    """Every (prompt row, completion row) KL pair the recipe's KTO micro-batches will build.

    Replays ``sampler`` (a :class:`~torchtune_prefopt.training.data_order.GlobalBatchSampler`;
    its epoch/resume position is restored afterwards) for ``epochs`` (a count: epochs
    ``0..epochs-1``, or an iterable of epoch numbers) and applies
    KTO's pairing (:func:`~torchtune_prefopt.data.kl_partner`) over each *global* micro-batch. ``max_batches_per_epoch`` limits the micro-batches
    per epoch (``max_steps_per_epoch * gradient_accumulation_steps``). Unique pairs, in first
    use order.
    """
    epoch_list = range(epochs) if isinstance(epochs, int) else list(epochs)
    saved = (sampler.epoch, sampler.start_batch)
    seen: Dict[Tuple[int, int], None] = {}
    try:
        for e in epoch_list:
            sampler.set_epoch(e, 0)
            for b, rows in enumerate(sampler):
                if max_batches_per_epoch is not None and b >= max_batches_per_epoch:
                    break
                n = len(rows)
                for k in range(n):
                    seen.setdefault((int(rows[k]), int(rows[kl_partner(k, n)])), None)
    finally:
        sampler.set_epoch(*saved)
    return list(seen)


def _has_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


@dataclass(frozen=True)
class PrecomputeJob:
    """What one precompute pass scores, and how it is split over the ranks.

    Attributes:
        dataset: paired rows (``chosen_input_ids`` ...) or KTO rows (``prompt_ids`` ...).
        collate_fn: a :class:`~torchtune_prefopt.data.PreferenceCollator` over all of a batch's
            items (``rows_per_rank=None``): the padded layout with the recipe's padding id and
            ``max_seq_len``, so the token sequences are identical to the live ones whatever
            layout training uses.
        batch_size: rows per forward (paired: pairs, i.e. ``2 * batch_size`` sequences).
        world_size, rank: batch ``k`` (rows ``[k * batch_size, (k + 1) * batch_size)``) runs on
            rank ``k % world_size``; the result does not depend on ``world_size``.
        device: where the model runs.
        kl_pairs: KTO only: (prompt row, completion row) pairs to score (:func:`kto_kl_pairs`).
        what: the rows, for the log (``the training rows``).
    """

    dataset: Any
    collate_fn: Callable[[List[Mapping[str, Any]]], PreferenceBatch]
    batch_size: int
    world_size: int = 1
    rank: int = 0
    device: Union[str, torch.device] = "cpu"
    kl_pairs: Optional[Sequence[Tuple[int, int]]] = None
    what: str = "the training rows"


@torch.no_grad()
def precompute_reference_logps(
    model: torch.nn.Module, job: PrecomputeJob, chunk_size: int = 1024, *, log_every: int = 50
) -> Dict[str, Tensor]:
    """One no-grad reference pass over ``job.dataset``, sharded over ranks; every rank gets all
    rows.

    Args:
        model: the reference ``TransformerDecoder`` (plain, FSDP2-sharded or quantized). With
            FSDP2 every rank must call this (each forward is collective); ranks run the same
            number of forwards (a rank without a batch of its own in the last round runs a
            dummy one).
        job: the rows and their split (:class:`PrecomputeJob`).
        chunk_size: ``decoder_sequence_logprobs`` chunk size.

    Returns:
        CPU tensors indexed by dataset position (see the module docstring); fp32 sums/means,
        int64 token counts.
    """
    dataset, collate_fn, batch_size = job.dataset, job.collate_fn, job.batch_size
    world_size, rank, kl_pairs = job.world_size, job.rank, job.kl_pairs
    device = torch.device(job.device)
    n = len(dataset)
    if n == 0:
        raise ValueError("precompute_reference_logps: empty dataset")
    paired = is_paired_row(dataset[0])
    was_training = model.training
    model.eval()

    # -- the sequences to score, as a list of jobs
    if paired:
        jobs: List[Any] = list(range(n))
        fields = [
            "chosen_sum",
            "chosen_mean",
            "chosen_num_tokens",
            "rejected_sum",
            "rejected_mean",
            "rejected_num_tokens",
        ]
    else:
        jobs = [(i, i) for i in range(n)] + [(int(i), int(j)) for i, j in (kl_pairs or [])]
        fields = ["sum", "mean", "num_tokens"]
    n_jobs = len(jobs)
    width = 6 if paired else 3
    out = torch.zeros(n_jobs, width, dtype=torch.float64)
    filled = torch.zeros(n_jobs, dtype=torch.float64)
    n_batches = (n_jobs + batch_size - 1) // batch_size
    rounds = (n_batches + world_size - 1) // world_size
    t0 = time.perf_counter()
    cache_items: Dict[int, Mapping[str, Any]] = {}
    # an FSDP2 forward is collective: every rank must run the same number of them
    collective = world_size > 1 and _has_fsdp(model)

    def item(i: int) -> Mapping[str, Any]:
        if i not in cache_items:
            cache_items[i] = dataset[i]
        return cache_items[i]

    for r in range(rounds):
        k = r * world_size + rank
        real = k < n_batches
        if not real and not collective:
            continue
        lo, hi = (
            (k * batch_size, min((k + 1) * batch_size, n_jobs))
            if real
            else (0, min(batch_size, n_jobs))
        )
        chunk = jobs[lo:hi]
        if paired:
            items = [item(i) for i in chunk]
            batch = collate_fn(items).to(device)
            lp = batch.logps(model, chunk_size)
            sides = lp.halves()
            cols = [getattr(side, f) for side in sides for f in ("sum", "mean", "num_tokens")]
            vals = torch.stack([c.detach().to("cpu", torch.float64) for c in cols], dim=1)
        else:
            items = []
            for p, c in chunk:
                it = dict(item(p))
                partner = item(c)
                it["completion_ids"] = partner["completion_ids"]
                it["completion_labels"] = completion_labels(partner)
                items.append(it)
            pad_one = len(items) == 1  # kto_collate needs >= 2 rows; the duplicate is dropped
            batch = collate_fn(items + items if pad_one else items).to(device)
            lp = batch.logps(model, chunk_size, with_kl=False)[: len(items)]
            cols = [lp.sum, lp.mean, lp.num_tokens]
            vals = torch.stack([c.detach().to("cpu", torch.float64) for c in cols], dim=1)
        if real:
            out[lo:hi] = vals
            filled[lo:hi] += 1
        if rank == 0 and log_every and (r + 1) % log_every == 0:
            dt = time.perf_counter() - t0
            log.info(
                f"reference log-probs: {min((r + 1) * world_size, n_batches)}/{n_batches} batches, {dt:.0f}s"
            )

    if world_size > 1:
        import torch.distributed as dist

        coll = torch.cat([out, filled[:, None]], dim=1).to(device)
        dist.all_reduce(coll, op=dist.ReduceOp.SUM)
        coll = coll.cpu()
        out, filled = coll[:, :width], coll[:, width]
    if not bool((filled == 1).all()):
        bad = (filled != 1).nonzero().flatten()[:5].tolist()
        raise RuntimeError(f"precompute_reference_logps: jobs {bad} were not computed exactly once")
    if was_training:
        model.train()

    result: Dict[str, Tensor] = {}
    for f_i, name in enumerate(fields):
        col = out[:n, f_i]
        result[name] = col.to(torch.int64) if name.endswith("num_tokens") else col.to(torch.float32)
    if not paired:
        kl = out[n:]
        result["kl_pairs"] = torch.tensor([list(j) for j in jobs[n:]], dtype=torch.int64).reshape(
            -1, 2
        )
        result["kl_sum"] = kl[:, 0].to(torch.float32)
        result["kl_mean"] = kl[:, 1].to(torch.float32)
        result["kl_num_tokens"] = kl[:, 2].to(torch.int64)
    if rank == 0:
        log.info(
            f"reference log-probs precomputed: {n} rows"
            + (f" + {n_jobs - n} KL pairs" if not paired else "")
            + f" in {time.perf_counter() - t0:.1f}s on {world_size} process(es)"
        )
    return result
