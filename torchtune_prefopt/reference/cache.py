"""Cached reference log-probs: one no-grad pass over the data, stored on disk, reused.

The reference model is frozen, so its log-probs of every training sequence are fixed. For a
run with several epochs, or runs repeated with other hyperparameters, they can be computed
once (:func:`precompute_reference_logps`), stored (:class:`ReferenceLogpsCache`) and looked
up by dataset position (:class:`CachedReferenceLogps`) instead of running the reference
forward every step; the reference model then need not be kept in memory during training.

**What is stored** (safetensors, no pickle), per dataset position ``i`` (``[N]`` tensors):

* paired data: ``chosen_sum``, ``chosen_mean``, ``chosen_num_tokens`` and the same for
  ``rejected``; both the sum and the mean, so ``loss.average_logps`` does not matter;
* KTO data: ``sum``, ``mean``, ``num_tokens`` of each row, plus the KL rows: ``kl_pairs``
  ``[P, 2]`` (prompt position, completion position) and ``kl_sum``, ``kl_mean``,
  ``kl_num_tokens`` ``[P]``. KTO's KL row ``k`` of a *global* micro-batch is prompt ``k`` +
  completion ``k + 1 (mod B)`` (:func:`~torchtune_prefopt.data.kto_collate`), so it depends
  on which rows share a micro-batch: :func:`kto_kl_pairs` replays the recipe's
  :class:`~torchtune_prefopt.training.data_order.GlobalBatchSampler` (a deterministic function
  of seed, epoch and global batch size) to list every pair a run will use.

**Identity** (:func:`reference_fingerprint`): sha256 over the reference weights, the
tokenized dataset rows in order, the tokenizer, ``max_seq_len``, the quantization mode, any
``extra`` the caller adds (model config, dtype, KL pairs, ...) and :data:`FORMAT_VERSION`.
A cache whose fingerprint differs is never used: :meth:`ReferenceLogpsCache.load` logs which
inputs changed and returns ``None`` (recompute). A damaged file (unparseable, or whose
tensors no longer match the content hash in its header) is logged with its path and also
recomputed (``strict=True`` raises :class:`~torchtune_prefopt.errors.PrefOptUserError`).

**Weights hashing** (``weights_hash=``), the trade-off:

* ``"content"`` (default): sha256 of every weight file's full bytes, streamed in 16 MiB
  blocks, files hashed in parallel threads (hashlib releases the GIL). Exact. Cost: reading
  the checkpoint once more. Measured with this code (x86-64 with SHA-NI, OpenSSL 3): ~1 GB
  of sha256 per CPU-second per thread, and threads scale over files (2 threads: 2x); a 70B
  bf16 checkpoint (140 GB in ~30 files) is ~140 CPU-seconds, ~20 s of wall time on 8 cores,
  so in practice bounded by the disk read (NVMe ~2-3 GB/s: about a minute). To pay it once,
  each file's digest is memoised in ``<cache dir>/weights_digests.json`` keyed by the file's
  real path, size, inode, ``mtime_ns`` *and* ``ctime_ns``: any write to the file, or any
  ``touch``/``utime`` to hide one, changes ``ctime``, which cannot be set from user space, so
  the memo is content-exact in practice (only a clock reset or direct block-device writes
  fool it). Pass ``digest_memo=None`` to always re-read.
* ``"header"``: the safetensors header (tensor names, dtypes, shapes, offsets), the file size
  and ``mtime_ns``. Instant, but **not** content-exact: two fine-tunes of the same
  architecture have identical headers and sizes, and a copy that keeps ``mtime`` (``cp -p``,
  ``rsync -t``) of a different checkpoint can collide. Only for users who know their
  checkpoint directories are immutable.

Sharding of the precompute: the rows are cut into fixed batches of ``batch_size`` (in
position order, independent of the number of processes) and batch ``k`` runs on rank
``k mod world_size``; the per-row results are then assembled on every rank with one
``all_reduce`` (each position is filled by exactly one rank, the others contribute exact
zeros). Because a batch's content, padding and shape do not depend on the world size, the
result is bitwise the same on 1 or N processes (given the same device and kernels).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import struct
import time
from array import array
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.modules import SequenceLogProbs, decoder_sequence_logprobs

__all__ = [
    "FORMAT_VERSION",
    "CachedReferenceLogps",
    "PositionIndexed",
    "ReferenceLogpsCache",
    "fingerprint_parts",
    "hash_dataset",
    "hash_tokenizer",
    "hash_weights",
    "kto_kl_pairs",
    "load_or_compute",
    "precompute_reference_logps",
    "reference_fingerprint",
]

def _logger():
    from torchtune import utils

    return utils.get_logger("INFO")  # the recipe's logger (stream handler, INFO)


log = _logger()

FORMAT_VERSION = 1
CACHE_FILE = "reference_logps.safetensors"
DIGEST_MEMO = "weights_digests.json"
_BLOCK = 16 * 2**20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

PathLike = Union[str, os.PathLike]
Weights = Union[Mapping[str, Tensor], PathLike, Sequence[PathLike]]


# =========================================================================== hashing


def _sha() -> "hashlib._Hash":
    return hashlib.sha256()


def _file_content_digest(path: Path) -> str:
    h = _sha()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def _safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise PrefOptUserError(f"reference weights file {path} is not a safetensors file (truncated)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise PrefOptUserError(f"reference weights file {path} has an implausible safetensors header ({n} bytes)")
        return raw + f.read(n)


def _file_header_digest(path: Path) -> str:
    st = path.stat()
    h = _sha()
    h.update(f"size={st.st_size};mtime_ns={st.st_mtime_ns};".encode())
    if path.suffix == ".safetensors":
        h.update(_safetensors_header(path))
    return h.hexdigest()


def _memo_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def _weight_files(weights: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    if isinstance(weights, (str, os.PathLike)):
        p = Path(weights)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)
            files = [f for f in files if not f.name.startswith("adapter")]
            if (p / "config.json").is_file():
                files.append(p / "config.json")
            if not files:
                raise PrefOptUserError(f"reference weights: no weight files in {p}")
            return files
        paths = [p]
    else:
        paths = [Path(x) for x in weights]
    for f in paths:
        if not f.is_file():
            raise PrefOptUserError(f"reference weights: {f} is not a file")
    return paths


def hash_weights(
    weights: Weights,
    *,
    mode: str = "content",
    digest_memo: Optional[PathLike] = None,
    max_workers: Optional[int] = None,
) -> str:
    """sha256 identifying the reference weights.

    Args:
        weights: a state dict (name -> plain tensor: names, dtypes, shapes and bytes are
            hashed), a checkpoint directory (its ``*.safetensors``/``*.bin``/``*.pt`` files
            except adapters, plus ``config.json``), or a list of files (e.g. a torchtune
            checkpointer's ``_checkpoint_paths`` + ``config.json``). Files are identified by
            their *names* (not directories) and content, so a moved copy hashes the same.
        mode: ``"content"`` (exact, default) or ``"header"`` (cheap, not exact); see the
            module docstring.
        digest_memo: JSON file memoising per-file content digests (``"content"`` mode).
        max_workers: threads for hashing several files at once (default: up to 8).
    """
    if mode not in ("content", "header"):
        raise ValueError(f"weights hash mode must be 'content' or 'header', got {mode!r}")
    h = _sha()
    if isinstance(weights, Mapping):
        h.update(b"state_dict;")
        for name in sorted(weights):
            t = weights[name]
            if not isinstance(t, Tensor):
                raise TypeError(f"state dict entry {name!r} is not a tensor")
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    files = _weight_files(weights)
    h.update(f"files:{mode};".encode())
    if mode == "header":
        digests = [_file_header_digest(f) for f in files]
    else:
        memo: Dict[str, str] = {}
        memo_path = Path(digest_memo) if digest_memo is not None else None
        if memo_path is not None and memo_path.is_file():
            try:
                memo = json.loads(memo_path.read_text())
                if not isinstance(memo, dict):
                    memo = {}
            except (OSError, ValueError):
                memo = {}
        keys = [_memo_key(f) for f in files]
        todo = [i for i, k in enumerate(keys) if k not in memo]
        if todo:
            workers = max_workers or min(8, os.cpu_count() or 1, len(todo))
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
                done = list(pool.map(lambda i: _file_content_digest(files[i]), todo))
            nbytes = sum(files[i].stat().st_size for i in todo)
            dt = time.perf_counter() - t0
            log.info(
                f"hashed {len(todo)} reference weight file(s), {nbytes / 2**20:.0f} MiB in {dt:.1f}s "
                f"({nbytes / 2**20 / max(dt, 1e-9):.0f} MiB/s)"
            )
            for i, d in zip(todo, done):
                memo[keys[i]] = d
            if memo_path is not None:
                _atomic_write_bytes(memo_path, json.dumps(memo, indent=1, sort_keys=True).encode())
        digests = [memo[k] for k in keys]
    for f, d in sorted(zip((f.name for f in files), digests)):
        h.update(f"{f}={d};".encode())
    return h.hexdigest()


def _update_value(h, value: Any) -> None:
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, bool):
        h.update(b"B1" if value else b"B0")
    elif isinstance(value, int):
        h.update(b"I" + str(value).encode() + b";")
    elif isinstance(value, float):
        h.update(b"F" + repr(value).encode() + b";")
    elif isinstance(value, str):
        b = value.encode()
        h.update(b"S" + str(len(b)).encode() + b":" + b)
    elif value is None:
        h.update(b"N")
    elif isinstance(value, (list, tuple)):
        if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            h.update(b"L" + str(len(value)).encode() + b":")
            try:
                h.update(array("q", value).tobytes())
            except OverflowError:
                h.update(repr(list(value)).encode())
        else:
            h.update(b"[" + str(len(value)).encode() + b":")
            for x in value:
                _update_value(h, x)
            h.update(b"]")
    elif isinstance(value, Mapping):
        h.update(b"{" + str(len(value)).encode() + b":")
        for k in sorted(value, key=str):
            _update_value(h, str(k))
            _update_value(h, value[k])
        h.update(b"}")
    else:
        raise TypeError(f"cannot fingerprint a value of type {type(value).__name__}")


def hash_dataset(dataset, skip_keys: Iterable[str] = ("index",)) -> str:
    """sha256 over every row of ``dataset`` in order (all keys but ``skip_keys``).

    Token id lists are hashed as int64 arrays, so this is exact: one token of one row
    changes it. ``index`` is skipped: the row's position already is its identity.
    """
    skip = set(skip_keys)
    h = _sha()
    n = len(dataset)
    h.update(f"rows={n};".encode())
    for i in range(n):
        item = dataset[i]
        _update_value(h, {k: v for k, v in item.items() if k not in skip})
    return h.hexdigest()


_PROBE_TEXT = "Reference probe: Hello, world! 123 \u00e9\u4e2d\u6587 <|im_end|> \n\t  end."


def hash_tokenizer(tokenizer: Any) -> str:
    """sha256 identifying a tokenizer.

    ``tokenizer`` is a tokenizer object (hashed through what it does: its encoding of a
    fixed probe text with and without special tokens, a chat-template probe through
    ``tokenize_messages``, its special-token table and pad/eos/bos ids), or a file path / list
    of paths (vocab, merges, tokenizer.json: their bytes are hashed). The dataset's token ids
    already determine the log-probs; this also catches a tokenizer change whose effect on the
    data happens to be invisible (e.g. the padding id, a different template for new data).
    """
    h = _sha()
    if isinstance(tokenizer, (str, os.PathLike)) or (
        isinstance(tokenizer, (list, tuple)) and all(isinstance(x, (str, os.PathLike)) for x in tokenizer)
    ):
        paths = [tokenizer] if isinstance(tokenizer, (str, os.PathLike)) else list(tokenizer)
        for p in sorted(Path(x) for x in paths):
            h.update(f"{p.name};".encode())
            h.update(_file_content_digest(p).encode())
        return h.hexdigest()
    h.update(type(tokenizer).__qualname__.encode())
    for attr in ("pad_id", "eos_id", "bos_id"):
        _update_value(h, getattr(tokenizer, attr, None))
    special = getattr(tokenizer, "special_tokens", None)
    if isinstance(special, Mapping):
        _update_value(h, {str(k): v for k, v in special.items()})
    for kwargs in ({"add_bos": False, "add_eos": False}, {"add_bos": True, "add_eos": True}):
        try:
            ids = tokenizer.encode(_PROBE_TEXT, **kwargs)
        except TypeError:
            ids = tokenizer.encode(_PROBE_TEXT)
        _update_value(h, list(ids))
    if hasattr(tokenizer, "tokenize_messages"):
        try:
            import copy

            from torchtune.data import Message

            tok = copy.copy(tokenizer)
            if hasattr(tok, "max_seq_len"):
                tok.max_seq_len = None
            msgs = [
                Message(role="system", content="probe system", masked=True),
                Message(role="user", content=_PROBE_TEXT, masked=True),
                Message(role="assistant", content="probe answer"),
            ]
            ids, mask = tok.tokenize_messages(msgs)
            _update_value(h, list(ids))
            _update_value(h, [bool(m) for m in mask])
        except Exception as err:  # noqa: BLE001 - a tokenizer without chat support
            _update_value(h, f"tokenize_messages unavailable: {type(err).__name__}")
    return h.hexdigest()


def fingerprint_parts(
    weights: Weights,
    dataset,
    tokenizer: Any,
    max_seq_len: Optional[int],
    extra: Optional[Mapping[str, Any]] = None,
    *,
    quantization: Optional[str] = None,
    weights_hash: str = "content",
    digest_memo: Optional[PathLike] = None,
) -> Dict[str, str]:
    """The named components of :func:`reference_fingerprint` (each a short string)."""
    parts = {
        "format": str(FORMAT_VERSION),
        "weights": f"{weights_hash}:{hash_weights(weights, mode=weights_hash, digest_memo=digest_memo)}",
        "dataset": hash_dataset(dataset),
        "tokenizer": hash_tokenizer(tokenizer),
        "max_seq_len": str(max_seq_len),
        "quantization": str(quantization),
    }
    for k, v in sorted((extra or {}).items()):
        h = _sha()
        _update_value(h, _plain(v))
        parts[f"extra.{k}"] = h.hexdigest()
    return parts


def _plain(v: Any) -> Any:
    """OmegaConf containers -> plain Python; torch dtypes/devices -> str."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(v, (DictConfig, ListConfig)):
            return OmegaConf.to_container(v, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(v, (torch.dtype, torch.device, Path)):
        return str(v)
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _combine(parts: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True).encode()).hexdigest()


def reference_fingerprint(
    weights: Weights,
    dataset,
    tokenizer: Any,
    max_seq_len: Optional[int],
    extra: Optional[Mapping[str, Any]] = None,
    *,
    quantization: Optional[str] = None,
    weights_hash: str = "content",
    digest_memo: Optional[PathLike] = None,
) -> str:
    """sha256 (hex) of everything the cached reference log-probs depend on.

    Args:
        weights: reference state dict, checkpoint directory or list of files
            (:func:`hash_weights`).
        dataset: the tokenized dataset (rows hashed in order, :func:`hash_dataset`).
        tokenizer: tokenizer object or its files (:func:`hash_tokenizer`).
        max_seq_len: the truncation length (KTO's KL rows are truncated with it).
        extra: anything else that changes the numbers, each hashed under its key: e.g.
            ``{"model": cfg.model, "dtype": "bf16", "kl_pairs": pairs}``. ``average_logps``
            is not needed: the cache stores both sums and means.
        quantization: the reference quantization mode (``None``, ``int8``, ...).
        weights_hash: ``"content"`` (default, exact) or ``"header"`` (cheap, not exact).
        digest_memo: per-file content-digest memo (see the module docstring); the recipe
            passes ``<cache dir>/weights_digests.json``.

    Use :func:`fingerprint_parts` + :class:`ReferenceLogpsCache` ``(parts=...)`` to also get
    a log line naming *which* input changed when a cache is stale.
    """
    return _combine(
        fingerprint_parts(
            weights, dataset, tokenizer, max_seq_len, extra,
            quantization=quantization, weights_hash=weights_hash, digest_memo=digest_memo,
        )
    )


# =========================================================================== storage


from torchtune_prefopt.training.checkpoints import _fsync_dir  # noqa: E402  (one fsync helper)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _content_digest(tensors: Mapping[str, Tensor]) -> str:
    h = _sha()
    for name in sorted(tensors):
        h.update(name.encode() + b";")
        _update_value(h, tensors[name])
    return h.hexdigest()


class ReferenceLogpsCache:
    """Reference log-probs on disk: ``<dir>/reference_logps.safetensors``.

    Args:
        dir: cache directory (created on save).
        fingerprint: :func:`reference_fingerprint` of the inputs.
        parts: optional :func:`fingerprint_parts` (then ``fingerprint`` may be ``None``): stored
            in the file so a stale cache's log line names the inputs that changed.

    The header's metadata holds the format version, the fingerprint, the parts and a sha256 of
    the tensors' content; :meth:`load` checks all of them.
    """

    def __init__(self, dir: PathLike, fingerprint: Optional[str] = None, parts: Optional[Mapping[str, str]] = None):
        if fingerprint is None and parts is None:
            raise ValueError("ReferenceLogpsCache needs a fingerprint or its parts")
        self.dir = Path(dir)
        self.parts = dict(parts) if parts is not None else None
        self.fingerprint = fingerprint if fingerprint is not None else _combine(self.parts)
        if parts is not None and fingerprint is not None and _combine(self.parts) != fingerprint:
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
        _atomic_write_bytes(self.path, save(plain, metadata=meta))
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
            self._fail(f"reference log-prob cache {self.path} is damaged ({type(err).__name__}: {err})", strict)
            return None
        if meta.get("format") != str(FORMAT_VERSION):
            self._fail(
                f"reference log-prob cache {self.path} has format {meta.get('format')!r}, "
                f"this version reads {FORMAT_VERSION}",
                strict,
            )
            return None
        if meta.get("fingerprint") != self.fingerprint:
            self._fail(f"reference log-prob cache {self.path} is stale ({self._why_stale(meta)})", strict)
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
            return "written for other inputs: fingerprint " f"{str(meta.get('fingerprint'))[:12]}, expected {self.fingerprint[:12]}"
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
    cache: Optional[ReferenceLogpsCache],
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


def _broadcast_tensors(data: Optional[Dict[str, Tensor]], rank: int, device: torch.device) -> Dict[str, Tensor]:
    import torch.distributed as dist

    spec = [[(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in sorted(data.items())]] if rank == 0 else [None]
    dist.broadcast_object_list(spec, src=0)
    out = {}
    for name, dtype, shape in spec[0]:
        t = data[name].to(device) if rank == 0 else torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(t, src=0)
        out[name] = t.cpu()
    return out


# =========================================================================== lookup


class CachedReferenceLogps:
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
        """``[2B]`` log-probs, chosen rows then rejected rows (:func:`paired_collate` layout)."""
        idx = torch.as_tensor(index, dtype=torch.long).cpu()
        t = self.t
        return self._seq(
            torch.cat([t["chosen_sum"][idx], t["rejected_sum"][idx]]),
            torch.cat([t["chosen_mean"][idx], t["rejected_mean"][idx]]),
            torch.cat([t["chosen_num_tokens"][idx], t["rejected_num_tokens"][idx]]),
            device,
        )

    def rows(self, index: Tensor, device=None) -> SequenceLogProbs:
        """``[B]`` KTO row log-probs."""
        idx = torch.as_tensor(index, dtype=torch.long).cpu()
        return self._seq(self.t["sum"][idx], self.t["mean"][idx], self.t["num_tokens"][idx], device)

    def kl(self, prompt_index: Tensor, completion_index: Tensor, device=None) -> SequenceLogProbs:
        """``[B]`` KL-row log-probs of (prompt row, completion row) pairs."""
        ks = []
        for i, j in zip(torch.as_tensor(prompt_index).tolist(), torch.as_tensor(completion_index).tolist()):
            k = self._kl.get((i, j))
            if k is None:
                raise KeyError(
                    f"KL pair (prompt row {i}, completion row {j}) is not in the reference cache: it "
                    "was precomputed for another data order (seed, batch size, epochs)"
                )
            ks.append(k)
        k = torch.tensor(ks, dtype=torch.long)
        return self._seq(self.t["kl_sum"][k], self.t["kl_mean"][k], self.t["kl_num_tokens"][k], device)


class PositionIndexed(torch.utils.data.Dataset):
    """Wraps a dataset so each item's ``index`` is its position in *this* dataset.

    torchtune's ``ConcatDataset`` keeps each part's own ``index`` (restarting at 0), so
    ``index`` would not identify a row of the concatenation; the cache is keyed by position.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        item = dict(self.dataset[i])
        item["index"] = int(i)
        return item

    def __getattr__(self, name: str) -> Any:  # stats, labels, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


# =========================================================================== precompute


def kto_kl_pairs(sampler, epochs: Union[int, Iterable[int]], max_batches_per_epoch: Optional[int] = None) -> List[Tuple[int, int]]:
    """Every (prompt row, completion row) KL pair the recipe's KTO micro-batches will build.

    Replays ``sampler`` (a :class:`~torchtune_prefopt.training.data_order.GlobalBatchSampler`;
    its epoch/resume position is restored afterwards) for ``epochs`` (a count: epochs
    ``0..epochs-1``, or an iterable of epoch numbers) and applies
    :func:`~torchtune_prefopt.data.kto_collate`'s pairing over each *global* micro-batch:
    row ``k`` with row ``(k + 1) mod B``. ``max_batches_per_epoch`` limits the micro-batches
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
                    seen.setdefault((int(rows[k]), int(rows[(k + 1) % n])), None)
    finally:
        sampler.set_epoch(*saved)
    return list(seen)


def _has_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _is_paired(item: Mapping[str, Any]) -> bool:
    if "chosen_input_ids" in item:
        return True
    if "prompt_ids" in item and "completion_ids" in item:
        return False
    raise ValueError(f"unknown dataset row layout (keys {sorted(item)}): expected paired or KTO rows")


@torch.no_grad()
def precompute_reference_logps(
    model: torch.nn.Module,
    dataset,
    collate_fn: Callable[[List[Mapping[str, Any]]], Mapping[str, Tensor]],
    batch_size: int,
    world_size: int = 1,
    rank: int = 0,
    device: Union[str, torch.device] = "cpu",
    chunk_size: int = 1024,
    *,
    kl_pairs: Optional[Sequence[Tuple[int, int]]] = None,
    log_every: int = 50,
) -> Dict[str, Tensor]:
    """One no-grad reference pass over ``dataset``, sharded over ranks; every rank gets all rows.

    Args:
        model: the reference ``TransformerDecoder`` (plain, FSDP2-sharded or quantized). With
            FSDP2 every rank must call this (each forward is collective); ranks run the same
            number of forwards (a rank without a batch of its own in the last round runs a
            dummy one).
        dataset: paired rows (``chosen_input_ids`` ...) or KTO rows (``prompt_ids`` ...).
        collate_fn: the recipe's collate over a list of items: ``paired_collate`` (chosen rows
            then rejected rows) or ``kto_collate`` (with ``max_seq_len``), e.g. a ``partial``
            with the tokenizer's padding id. The same function the training step uses, so the
            token sequences are identical to the live ones.
        batch_size: rows per forward (paired: pairs, i.e. ``2 * batch_size`` sequences).
        world_size, rank: batch ``k`` (rows ``[k * batch_size, (k + 1) * batch_size)``) runs on
            rank ``k % world_size``; the result does not depend on ``world_size``.
        device: where the model runs.
        chunk_size: ``decoder_sequence_logprobs`` chunk size.
        kl_pairs: KTO only: (prompt row, completion row) pairs to score (:func:`kto_kl_pairs`).

    Returns:
        CPU tensors indexed by dataset position (see the module docstring); fp32 sums/means,
        int64 token counts.
    """
    device = torch.device(device)
    n = len(dataset)
    if n == 0:
        raise ValueError("precompute_reference_logps: empty dataset")
    paired = _is_paired(dataset[0])
    was_training = model.training
    model.eval()

    def run(ids: Tensor, labels: Tensor) -> SequenceLogProbs:
        return decoder_sequence_logprobs(model, ids.to(device), labels.to(device), chunk_size=chunk_size)

    # -- the sequences to score, as a list of jobs
    if paired:
        jobs: List[Any] = list(range(n))
        fields = ["chosen_sum", "chosen_mean", "chosen_num_tokens", "rejected_sum", "rejected_mean", "rejected_num_tokens"]
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
        lo, hi = (k * batch_size, min((k + 1) * batch_size, n_jobs)) if real else (0, min(batch_size, n_jobs))
        chunk = jobs[lo:hi]
        if paired:
            items = [item(i) for i in chunk]
            batch = collate_fn(items)
            lp = run(batch["input_ids"], batch["labels"])
            b = len(items)
            cols = [lp.sum[:b], lp.mean[:b], lp.num_tokens[:b], lp.sum[b:], lp.mean[b:], lp.num_tokens[b:]]
            vals = torch.stack([c.detach().to("cpu", torch.float64) for c in cols], dim=1)
        else:
            items = []
            for p, c in chunk:
                it = dict(item(p))
                it["completion_ids"] = item(c)["completion_ids"]
                items.append(it)
            pad_one = len(items) == 1  # kto_collate needs >= 2 rows; the duplicate is dropped
            batch = collate_fn(items + items if pad_one else items)
            lp = run(batch["input_ids"], batch["labels"])
            b = len(items)
            cols = [lp.sum[:b], lp.mean[:b], lp.num_tokens[:b]]
            vals = torch.stack([c.detach().to("cpu", torch.float64) for c in cols], dim=1)
        if real:
            out[lo:hi] = vals
            filled[lo:hi] += 1
        if rank == 0 and log_every and (r + 1) % log_every == 0:
            dt = time.perf_counter() - t0
            log.info(f"reference log-probs: {min((r + 1) * world_size, n_batches)}/{n_batches} batches, {dt:.0f}s")

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
        result["kl_pairs"] = torch.tensor([list(j) for j in jobs[n:]], dtype=torch.int64).reshape(-1, 2)
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
