"""The identity of cached reference log-probs: a content fingerprint of everything they
depend on.

:func:`reference_fingerprint` is the one entry point: sha256 over the reference weights, the
tokenized dataset rows in order, the tokenizer, ``max_seq_len``, the quantization mode, any
``extra`` the caller adds (model config, dtype, KL pairs, ...) and :data:`FORMAT_VERSION`. It
returns a :class:`Fingerprint`: the hex digest (a ``str``) that also carries its named
``parts``, so a stale cache can say *which* input changed.

**Weights hashing** (``weights_hash=``), the trade-off:

* ``"content"`` (default): sha256 of every weight file's full bytes, streamed in 16 MiB
  blocks, files hashed in parallel threads (hashlib releases the GIL). Exact; costs one more
  read of the checkpoint (throughput in BENCHMARKS.md, "Reference fingerprint"). To pay it
  once, each file's digest is memoised in the machine's memo (:func:`machine_digest_memo`:
  ``$PREFOPT_CACHE_DIR/weights_digests.json``, one memo for every run) keyed by the
  file's real path, size, inode, ``mtime_ns`` *and* ``ctime_ns``: any write to the file, or
  any ``touch``/``utime`` to hide one, changes ``ctime``, which cannot be set from user space,
  so the memo is content-exact in practice (only a clock reset or direct block-device writes
  fool it). Pass ``digest_memo=None`` to always re-read.
* ``"header"``: the safetensors header (tensor names, dtypes, shapes, offsets), the file size
  and ``mtime_ns``. Instant, but **not** content-exact: two fine-tunes of the same
  architecture have identical headers and sizes, and a copy that keeps ``mtime`` (``cp -p``,
  ``rsync -t``) of a different checkpoint can collide. Only for users who know their
  checkpoint directories are immutable.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import struct
import time
import weakref
from array import array
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from torchtune_prefopt.errors import PrefOptUserError
from torchtune_prefopt.files import atomic_write_bytes
from torchtune_prefopt.plain import to_plain

__all__ = [
    "FORMAT_VERSION",
    "machine_digest_memo",
    "Fingerprint",
    "hash_dataset",
    "hash_tokenizer",
    "hash_value",
    "hash_weights",
    "reference_fingerprint",
]


def _logger():
    from torchtune import utils

    return utils.get_logger("INFO")  # the recipe's logger (stream handler, INFO)


log = _logger()

#: Version of the cache's layout and of what the fingerprint covers.
FORMAT_VERSION = 1
_BLOCK = 16 * 2**20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

PathLike = Union[str, os.PathLike]
Weights = Union[Mapping[str, Tensor], PathLike, Sequence[PathLike]]


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
            raise PrefOptUserError(
                f"reference weights file {path} is not a safetensors file (truncated)"
            )
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise PrefOptUserError(
                f"reference weights file {path} has an implausible safetensors header ({n} bytes)"
            )
        return raw + f.read(n)


def _file_header_digest(path: Path) -> str:
    st = path.stat()
    h = _sha()
    h.update(f"size={st.st_size};mtime_ns={st.st_mtime_ns};".encode())
    if path.suffix == ".safetensors":
        h.update(_safetensors_header(path))
    return h.hexdigest()


def machine_digest_memo() -> Optional[Path]:
    """The machine's one memo of weight-file digests (``$PREFOPT_CACHE_DIR``, default
    ``~/.cache/torchtune_prefopt``): a checkpoint's bytes are hashed once per machine while
    its files keep their size, inode and times, whichever run (identity, reference cache)
    asks. ``None`` where that folder cannot be made."""
    root = Path(os.environ.get("PREFOPT_CACHE_DIR") or "~/.cache/torchtune_prefopt").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return root / "weights_digests.json" if os.access(root, os.W_OK) else None


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
                atomic_write_bytes(memo_path, json.dumps(memo, indent=1, sort_keys=True).encode())
        digests = [memo[k] for k in keys]
    for f, d in sorted(zip((f.name for f in files), digests)):
        h.update(f"{f}={d};".encode())
    return h.hexdigest()


def hash_value(h, value: Any) -> None:
    """Feed ``value`` (tensor, bool/int/float/str/None, list, tuple, mapping) into the hash
    object ``h``, typed and length-prefixed so different values never share a byte stream."""
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
                hash_value(h, x)
            h.update(b"]")
    elif isinstance(value, Mapping):
        h.update(b"{" + str(len(value)).encode() + b":")
        for k in sorted(value, key=str):
            hash_value(h, str(k))
            hash_value(h, value[k])
        h.update(b"}")
    else:
        raise TypeError(f"cannot fingerprint a value of type {type(value).__name__}")


#: digests of the dataset and tokenizer objects hashed in this process (a run's identity and
#: its reference cache's fingerprint read the same objects): object -> {kind: digest}
_OBJECT_DIGESTS: "weakref.WeakKeyDictionary[Any, Dict[str, str]]" = weakref.WeakKeyDictionary()


def _memoised(kind: str, obj: Any, compute) -> str:
    """``compute()`` once per live object and ``kind`` (a run's datasets and tokenizers do
    not change once built); objects that cannot be weakly referenced are hashed every time."""
    try:
        seen = _OBJECT_DIGESTS.setdefault(obj, {})
    except TypeError:
        return compute()
    if kind not in seen:
        seen[kind] = compute()
    return seen[kind]


def hash_dataset(dataset, skip_keys: Iterable[str] = ("index",)) -> str:
    """sha256 over every row of ``dataset`` in order (all keys but ``skip_keys``).

    Token id lists are hashed as int64 arrays, so this is exact: one token of one row
    changes it. ``index`` is skipped: the row's position already is its identity. Computed
    once per dataset object and process (a run hashes its rows for its identity and again for
    its reference cache's fingerprint).
    """
    skip_keys = tuple(skip_keys)
    return _memoised(f"dataset{skip_keys}", dataset, lambda: _hash_rows(dataset, skip_keys))


def _hash_rows(dataset, skip_keys: Iterable[str]) -> str:
    skip = set(skip_keys)
    h = _sha()
    n = len(dataset)
    h.update(f"rows={n};".encode())
    for i in range(n):
        item = dataset[i]
        hash_value(h, {k: v for k, v in item.items() if k not in skip})
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
    if isinstance(tokenizer, (str, os.PathLike, list, tuple)):
        return _hash_tokenizer(tokenizer)
    return _memoised("tokenizer", tokenizer, lambda: _hash_tokenizer(tokenizer))


def _hash_tokenizer(tokenizer: Any) -> str:
    h = _sha()
    if isinstance(tokenizer, (str, os.PathLike)) or (
        isinstance(tokenizer, (list, tuple))
        and all(isinstance(x, (str, os.PathLike)) for x in tokenizer)
    ):
        paths = [tokenizer] if isinstance(tokenizer, (str, os.PathLike)) else list(tokenizer)
        for p in sorted(Path(x) for x in paths):
            h.update(f"{p.name};".encode())
            h.update(_file_content_digest(p).encode())
        return h.hexdigest()
    h.update(type(tokenizer).__qualname__.encode())
    for attr in ("pad_id", "eos_id", "bos_id"):
        hash_value(h, getattr(tokenizer, attr, None))
    special = getattr(tokenizer, "special_tokens", None)
    if isinstance(special, Mapping):
        hash_value(h, {str(k): v for k, v in special.items()})
    for kwargs in ({"add_bos": False, "add_eos": False}, {"add_bos": True, "add_eos": True}):
        try:
            ids = tokenizer.encode(_PROBE_TEXT, **kwargs)
        except TypeError:
            ids = tokenizer.encode(_PROBE_TEXT)
        hash_value(h, list(ids))
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
            hash_value(h, list(ids))
            hash_value(h, [bool(m) for m in mask])
        except Exception as err:  # noqa: BLE001 - a tokenizer without chat support
            hash_value(h, f"tokenize_messages unavailable: {type(err).__name__}")
    return h.hexdigest()


class Fingerprint(str):
    """A fingerprint: the hex sha256 (this ``str``) of its named ``parts`` (each a short hex or
    text string: ``format``, ``weights``, ``dataset``, ``tokenizer``, ``max_seq_len``,
    ``quantization`` and ``extra.<key>``)."""

    parts: Dict[str, str]

    def __new__(cls, parts: Mapping[str, str]) -> "Fingerprint":
        parts = dict(parts)
        self = super().__new__(
            cls, hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        )
        self.parts = parts
        return self


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
) -> Fingerprint:
    """The :class:`Fingerprint` of everything the cached reference log-probs depend on.

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
            passes :func:`machine_digest_memo`.
    """
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
        hash_value(h, to_plain(v))
        parts[f"extra.{k}"] = h.hexdigest()
    return Fingerprint(parts)
