"""Load raw rows with provenance, so every validation error can name file and row.

Local JSON / JSONL (``source="json", data_files=...``) is parsed here with the ``json``
module (exact file, row and line numbers; a row of the wrong type cannot break the whole
load the way Arrow's schema inference does). Everything else (parquet, csv, Hub names,
other ``load_dataset`` kwargs) goes through :func:`datasets.load_dataset`; local files
given as ``data_files`` are loaded one file at a time so errors still name the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from torchtune_prefopt.errors import PrefOptUserError

_LOCAL_BUILDERS = {"json", "jsonl", "csv", "parquet", "arrow", "text"}


@dataclass
class RawRows:
    """Rows (dicts) plus where each came from."""

    rows: List[Mapping[str, Any]]
    # per row: (location, 0-based row number within that location, 1-based line or None)
    origin: List[Tuple[str, int, Optional[int]]]
    name: str  # short description of the whole source, for messages

    def where(self, i: int) -> str:
        loc, row, line = self.origin[i]
        return f"{loc} row {row}" + (f" (line {line})" if line is not None else "")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _resolve_data_files(data_files: Any, split: str) -> List[str]:
    if isinstance(data_files, Mapping):
        if split not in data_files:
            raise PrefOptUserError(
                f"split '{split}' not in data_files (available: {sorted(data_files)})"
            )
        data_files = data_files[split]
    elif split != "train":
        raise PrefOptUserError(
            f"split '{split}' requested but data_files is not a mapping of split -> files; "
            "local files form the single split 'train'"
        )
    if isinstance(data_files, (str, os.PathLike)):
        data_files = [data_files]
    files = [str(Path(os.fspath(f)).expanduser()) for f in data_files]
    if not files:
        raise PrefOptUserError("data_files is empty")
    for f in files:
        if not Path(f).is_file():
            raise PrefOptUserError(f"data file not found: {f}")
    return files


def _rows_from_json_value(path: str, data: Any) -> RawRows:
    if isinstance(data, dict):  # columnar: {"col": [values...], ...}
        cols = list(data)
        lengths = {len(data[c]) for c in cols}
        if len(lengths) > 1:
            raise PrefOptUserError(f"{path}: columns have different lengths {sorted(lengths)}")
        n = lengths.pop() if lengths else 0
        data = [{c: data[c][i] for c in cols} for i in range(n)]
    if not isinstance(data, list):
        raise PrefOptUserError(f"{path}: expected a list of row objects")
    origin: List[Tuple[str, int, Optional[int]]] = []
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise PrefOptUserError(
                f"{path} row {i}: expected a JSON object, got {type(obj).__name__}"
            )
        origin.append((path, i, None))
    return RawRows(list(data), origin, path)


def _is_columnar(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and all(isinstance(v, list) for v in data.values())


#: compressed files, told apart by their first bytes (the name may say nothing)
_COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bz2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
}


def _file_bytes(path: str) -> bytes:
    """A data file's bytes, decompressed if it is gzip, bz2 or xz (``.jsonl.gz`` ...)."""
    raw = Path(path).read_bytes()
    kind = next((k for magic, k in _COMPRESSED.items() if raw.startswith(magic)), None)
    if kind is None:
        return raw
    if kind == "zstd":
        raise PrefOptUserError(
            f"{path}: zstd-compressed, which this reader does not decompress; decompress it "
            "(zstd -d) or recompress it with gzip"
        )
    import bz2
    import gzip
    import lzma

    try:
        return {"gzip": gzip.decompress, "bz2": bz2.decompress, "xz": lzma.decompress}[kind](raw)
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise PrefOptUserError(f"{path}: a damaged {kind} file ({_one_line(err)})") from None


#: formats that are not JSON, told apart by their first bytes, and the source that reads them
_OTHER_FORMATS = {b"PAR1": ("a Parquet file", "parquet"), b"ARROW1": ("an Arrow file", "arrow")}


def _read_json_file(path: str, field: Optional[str]) -> RawRows:
    """JSON Lines (one object per line), a JSON list of objects, or columnar JSON; gzip,
    bz2 or xz compressed too."""
    raw = _file_bytes(path)
    for magic, (what, source) in _OTHER_FORMATS.items():
        if raw.startswith(magic):
            raise PrefOptUserError(
                f"{path} is {what}, not JSON: set source: {source} (source={source} on the command line)"
            )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise PrefOptUserError(
            f"{path} line {line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None
    stripped = text.lstrip()
    if field is not None or stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PrefOptUserError(
                f"{path} line {e.lineno}: invalid JSON ({_one_line(e.msg)})"
            ) from None
        if field is not None:
            if not isinstance(data, dict) or field not in data:
                raise PrefOptUserError(f"{path}: no top-level field '{field}'")
            data = data[field]
            if isinstance(data, dict) and not _is_columnar(data):
                raise PrefOptUserError(f"{path}: field '{field}' is not a list of rows")
        return _rows_from_json_value(path, data)

    if not path.endswith(
        (".jsonl", ".jsonl.gz", ".jsonl.bz2", ".jsonl.xz")
    ) and stripped.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if _is_columnar(data):
            return _rows_from_json_value(path, data)

    rows: List[Mapping[str, Any]] = []
    origin: List[Tuple[str, int, Optional[int]]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrefOptUserError(
                f"{path} line {lineno}: invalid JSON ({_one_line(e.msg)})"
            ) from None
        if not isinstance(obj, dict):
            raise PrefOptUserError(
                f"{path} line {lineno}: expected a JSON object per line, got {type(obj).__name__}"
            )
        origin.append((path, len(rows), lineno))
        rows.append(obj)
    return RawRows(rows, origin, path)


def _concat(parts: Sequence[RawRows], name: str) -> RawRows:
    rows, origin = [], []
    for p in parts:
        rows.extend(p.rows)
        origin.extend(p.origin)
    return RawRows(rows, origin, name)


def load_rows(source: str, *, split: str = "train", **load_dataset_kwargs: Any) -> RawRows:
    """Load rows from local JSON/JSONL files or anything :func:`datasets.load_dataset` reads."""
    if not isinstance(source, str) or not source:
        raise PrefOptUserError(f"dataset source must be a non-empty string, got {source!r}")
    data_files = load_dataset_kwargs.get("data_files")
    extra = set(load_dataset_kwargs) - {"data_files", "field"}
    if source in ("json", "jsonl") and data_files is not None and not extra:
        files = _resolve_data_files(data_files, split)
        parts = [_read_json_file(f, load_dataset_kwargs.get("field")) for f in files]
        return _concat(parts, files[0] if len(files) == 1 else f"{len(files)} files")

    import datasets

    saved = _saved_dataset_dir(source)
    if saved is not None:
        return _load_saved(saved, split)
    if source in _LOCAL_BUILDERS and data_files is not None:
        files = _resolve_data_files(data_files, split)
        rest = {k: v for k, v in load_dataset_kwargs.items() if k != "data_files"}
        parts = []
        for f in files:
            try:
                ds = datasets.load_dataset(source, data_files=f, split="train", **rest)
            except Exception as err:  # noqa: BLE001 - a local file the builder cannot read
                cause = err.__cause__ or err
                raise PrefOptUserError(
                    f"dataset source '{source}' failed on {f}: {type(cause).__name__}: {_one_line(cause)}"
                ) from None
            parts.append(RawRows(ds.to_list(), [(f, i, None) for i in range(len(ds))], f))
        return _concat(parts, files[0] if len(files) == 1 else f"{len(files)} files")

    try:
        ds = datasets.load_dataset(source, split=split, **load_dataset_kwargs)
    except (ConnectionError, OSError, FileNotFoundError) as err:
        cause = err.__cause__ or err
        raise PrefOptUserError(
            f"source '{source}' could not be loaded ({type(cause).__name__}: {_one_line(cause)[:300]}); "
            "offline or for your own file pass source=json data_files=<file.jsonl> split=train "
            "(parquet: source=parquet; a save_to_disk folder: source=<folder>)"
        ) from None
    name = f"{source}[{split}]"
    return RawRows(ds.to_list(), [(name, i, None) for i in range(len(ds))], name)


def _saved_dataset_dir(source: str) -> Optional[Path]:
    """``source`` as a folder written by ``datasets``' ``save_to_disk`` (a Dataset has
    ``state.json``, a DatasetDict ``dataset_dict.json``), else ``None``."""
    path = Path(source).expanduser()
    if path.is_dir() and (
        (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    ):
        return path
    return None


def _load_saved(path: Path, split: str) -> RawRows:
    """The rows of a ``save_to_disk`` folder: a DatasetDict's ``split``, or a Dataset (one
    split, read as ``train``)."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise PrefOptUserError(
                f"split '{split}' not in the saved DatasetDict {path} (splits: {sorted(loaded)})"
            )
        loaded, name = loaded[split], f"{path}[{split}]"
    elif split != "train":
        raise PrefOptUserError(
            f"split '{split}' requested but {path} is one saved Dataset (no splits): set split=train"
        )
    else:
        name = str(path)
    return RawRows(loaded.to_list(), [(name, i, None) for i in range(len(loaded))], name)


def rows_from_records(records: Sequence[Mapping[str, Any]], name: str = "records") -> RawRows:
    """Wrap in-memory rows (used by tests and programmatic callers)."""
    return RawRows(list(records), [(name, i, None) for i in range(len(records))], name)
