"""The on-disk store of reference log-probs: ``<dir>/reference_logps.safetensors``.

**What is stored** (safetensors, no pickle), per dataset position ``i`` (``[N]`` tensors):

* paired data: ``chosen_sum``, ``chosen_mean``, ``chosen_num_tokens`` and the same for
  ``rejected``; both the sum and the mean, so ``loss.average_logps`` does not matter;
* KTO data: ``sum``, ``mean``, ``num_tokens`` of each row, plus the KL rows: ``kl_pairs``
  ``[P, 2]`` (prompt position, completion position) and ``kl_sum``, ``kl_mean``,
  ``kl_num_tokens`` ``[P]`` (see :func:`~torchtune_prefopt.reference.precompute.kto_kl_pairs`).

The header's metadata holds :data:`~torchtune_prefopt.reference.fingerprint.FORMAT_VERSION`,
the fingerprint, its parts and a sha256 of the tensors' content. A cache whose fingerprint
differs is never used: :meth:`ReferenceCacheFile.load` logs which inputs changed and returns
``None`` (recompute). A damaged file (unparseable, or whose tensors no longer match the
content hash in its header) is logged with its path and also recomputed (``strict=True``
raises :class:`~torchtune_prefopt.errors.PrefOptUserError`). Writes are atomic
(:func:`torchtune_prefopt.files.atomic_write_bytes`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Union

import torch
from torch import Tensor

from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.files import atomic_write_bytes
from torchtune_prefopt.reference.fingerprint import FORMAT_VERSION, Fingerprint, hash_value, log

__all__ = ["CACHE_FILE", "ReferenceCacheFile", "load_or_compute"]

CACHE_FILE = "reference_logps.safetensors"

PathLike = Union[str, os.PathLike]


def _content_digest(tensors: Mapping[str, Tensor]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + b";")
        hash_value(h, tensors[name])
    return h.hexdigest()


class ReferenceCacheFile:
    """Reference log-probs on disk: ``<dir>/reference_logps.safetensors``.

    Args:
        dir: cache directory (created on save).
        fingerprint: :func:`~torchtune_prefopt.reference.fingerprint.reference_fingerprint` of
            the inputs. A :class:`Fingerprint` carries its parts, which are stored in the file
            so a stale cache's log line names the inputs that changed.
        parts: the parts alone (then ``fingerprint`` may be ``None``).

    The header's metadata holds the format version, the fingerprint, the parts and a sha256 of
    the tensors' content; :meth:`load` checks all of them.
    """

    def __init__(
        self,
        dir: PathLike,
        fingerprint: Optional[str] = None,
        parts: Optional[Mapping[str, str]] = None,
    ):
        if fingerprint is None and parts is None:
            raise ValueError("ReferenceCacheFile needs a fingerprint or its parts")
        if parts is None and isinstance(fingerprint, Fingerprint):
            parts = fingerprint.parts
        self.dir = Path(dir)
        self.parts = dict(parts) if parts is not None else None
        self.fingerprint = (
            str(fingerprint) if fingerprint is not None else str(Fingerprint(self.parts))
        )
        if self.parts is not None and str(Fingerprint(self.parts)) != self.fingerprint:
            raise ValueError("fingerprint does not match its parts")
        self.path = self.dir / CACHE_FILE
        self.last_reason: Optional[str] = None

    def exists(self) -> bool:
        """A cache file is present (it may still be stale or damaged: see :meth:`load`)."""
        return self.path.is_file()

    def save(self, tensors: Mapping[str, Tensor]) -> Path:
        """Write ``tensors`` atomically (temporary file, fsync, rename). Returns the path."""
        from safetensors.torch import save

        plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        meta = {
            "format": str(FORMAT_VERSION),
            "fingerprint": self.fingerprint,
            "content_sha256": _content_digest(plain),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if self.parts is not None:
            meta["parts"] = json.dumps(self.parts, sort_keys=True)
        atomic_write_bytes(self.path, save(plain, metadata=meta))
        return self.path

    def _fail(self, reason: str, strict: bool) -> None:
        self.last_reason = reason
        if strict:
            raise PrefOptUserError(reason)
        log.warning(f"{reason}; recomputing the reference log-probs")

    def load(self, strict: bool = False) -> Optional[Dict[str, Tensor]]:
        """The cached tensors, or ``None`` (missing, stale or damaged: logged with the reason).

        ``strict=True`` raises :class:`PrefOptUserError` naming the file instead of returning
        ``None`` for a stale or damaged cache (a missing one still returns ``None``).
        """
        self.last_reason = None
        if not self.exists():
            self.last_reason = f"no reference log-prob cache at {self.path}"
            log.info(self.last_reason)
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # noqa: BLE001 - any parse error means a damaged file
            self._fail(
                f"reference log-prob cache {self.path} is damaged ({type(err).__name__}: {err})",
                strict,
            )
            return None
        if meta.get("format") != str(FORMAT_VERSION):
            self._fail(
                f"reference log-prob cache {self.path} has format {meta.get('format')!r}, "
                f"this version reads {FORMAT_VERSION}",
                strict,
            )
            return None
        if meta.get("fingerprint") != self.fingerprint:
            self._fail(
                f"reference log-prob cache {self.path} is stale ({self._why_stale(meta)})", strict
            )
            return None
        if meta.get("content_sha256") != _content_digest(tensors):
            self._fail(
                f"reference log-prob cache {self.path} is damaged (its tensors do not match the content "
                "hash recorded when it was written)",
                strict,
            )
            return None
        log.info(f"loaded reference log-probs from {self.path}")
        return tensors

    def _why_stale(self, meta: Mapping[str, str]) -> str:
        old = None
        try:
            old = json.loads(meta["parts"]) if "parts" in meta else None
        except ValueError:
            old = None
        if old is None or self.parts is None:
            return (
                "written for other inputs: fingerprint "
                f"{str(meta.get('fingerprint'))[:12]}, expected {self.fingerprint[:12]}"
            )
        changed = sorted(k for k in set(old) | set(self.parts) if old.get(k) != self.parts.get(k))
        return "changed since it was written: " + ", ".join(changed)

    def load_or_compute(
        self,
        compute: Callable[[], Dict[str, Tensor]],
        *,
        rank: int = 0,
        world_size: int = 1,
        device: Union[str, torch.device] = "cpu",
    ) -> Dict[str, Tensor]:
        """:func:`load_or_compute` with this cache."""
        return load_or_compute(self, compute, rank=rank, world_size=world_size, device=device)


def load_or_compute(
    cache: Optional[ReferenceCacheFile],
    compute: Callable[[], Dict[str, Tensor]],
    *,
    rank: int = 0,
    world_size: int = 1,
    device: Union[str, torch.device] = "cpu",
) -> Dict[str, Tensor]:
    """Collective: rank 0 loads the cache (or every rank computes); every rank gets the tensors.

    Only rank 0 touches the file, so only rank 0 needs the cache object (and so the
    fingerprint, whose weights hash reads the whole checkpoint): other ranks may pass ``None``.
    The cache directory need not be shared between nodes: a valid cache is broadcast from
    rank 0. ``compute`` runs on every rank when the cache is missing, stale or damaged (it is
    itself collective, e.g. :func:`precompute_reference_logps`) and must return the same
    tensors everywhere. A failure to *write* the cache is logged and training goes on.
    """
    if rank == 0 and cache is None:
        raise ValueError("load_or_compute: rank 0 needs the cache")
    data = cache.load() if rank == 0 else None
    if world_size > 1:
        import torch.distributed as dist

        flag = [data is not None]
        dist.broadcast_object_list(flag, src=0)
        if flag[0]:
            data = _broadcast_tensors(data, rank, torch.device(device))
    if data is None:
        data = compute()
        if rank == 0:
            try:
                cache.save(data)
                log.info(f"saved reference log-probs to {cache.path}")
            except OSError as err:
                log.warning(f"could not write the reference log-prob cache {cache.path}: {err}")
        if world_size > 1:
            import torch.distributed as dist

            dist.barrier()
    return data


def _broadcast_tensors(
    data: Optional[Dict[str, Tensor]], rank: int, device: torch.device
) -> Dict[str, Tensor]:
    import torch.distributed as dist

    spec = (
        [
            [
                (k, str(v.dtype).removeprefix("torch."), tuple(v.shape))
                for k, v in sorted(data.items())
            ]
        ]
        if rank == 0
        else [None]
    )
    dist.broadcast_object_list(spec, src=0)
    out = {}
    for name, dtype, shape in spec[0]:
        t = (
            data[name].to(device)
            if rank == 0
            else torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        )
        dist.broadcast(t, src=0)
        out[name] = t.cpu()
    return out
