"""Read raw rows from .jsonl/.jsonl.gz/.json/.parquet files and datasets.load_from_disk folders."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from core.data.errors import INVALID_JSON, WRONG_SHAPE, DatasetError, RowError

SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")

Row = dict[str, Any]


def read_rows(path: str | Path) -> Iterator[tuple[int, Row | RowError]]:
    """Yield ``(line, row)`` pairs; ``line`` is the 1-based source line (JSONL) or row number.

    A JSONL line that is not valid JSON, or is valid JSON but not an object, yields a RowError
    for that line instead of raising. Blank JSONL lines are not rows and are passed over (their
    line numbers still count). A missing path, an unsupported suffix or a whole file that cannot
    be read raise DatasetError naming the path.
    """
    p = Path(path)
    if not p.exists():
        raise DatasetError("file not found", path=path)
    if p.is_dir():
        if not ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            raise DatasetError(
                "folder is not a datasets.save_to_disk dataset (no dataset_info.json)", path=path
            )
        return _read_saved_dataset(p, path)
    name = p.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return _read_jsonl(p, path)
    if name.endswith((".json", ".json.gz")):
        return _read_json(p, path)
    if name.endswith(".parquet"):
        return _read_parquet(p, path)
    raise DatasetError(
        f"unsupported file type '{p.suffix or p.name}'; use one of {', '.join(SUPPORTED_SUFFIXES)} "
        "or a datasets.save_to_disk folder",
        path=path,
    )


def _open_binary(p: Path) -> IO[bytes]:
    return gzip.open(p, "rb") if p.name.lower().endswith(".gz") else p.open("rb")


def _as_row(value: Any) -> Row | RowError:
    if isinstance(value, dict):
        return value
    shown = _json_type(value) or type(value).__name__
    return RowError(f"wrong shape: row is a JSON {shown}, expected an object", WRONG_SHAPE)


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return "null" if value is None else names.get(type(value), "")


def _parse_line(raw: bytes, first: bool = False) -> Row | RowError:
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")  # tolerate a byte-order mark
    except UnicodeDecodeError as exc:
        return RowError(f"invalid JSON: not valid UTF-8 at byte {exc.start}", INVALID_JSON)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return RowError(f"invalid JSON: {exc.msg} (column {exc.colno})", INVALID_JSON)
    return _as_row(value)


def _read_jsonl(p: Path, shown: str | Path) -> Iterator[tuple[int, Row | RowError]]:
    try:
        with _open_binary(p) as fh:
            for lineno, raw in enumerate(fh, start=1):
                if raw.strip():
                    yield lineno, _parse_line(raw, first=lineno == 1)
    except (OSError, EOFError, zlib.error) as exc:  # gzip corruption, permission problems
        raise DatasetError(f"cannot read file: {exc}", path=shown) from exc


def _read_json(p: Path, shown: str | Path) -> Iterator[tuple[int, Row | RowError]]:
    try:
        with _open_binary(p) as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"cannot read file: {exc}", path=shown) from exc
    try:
        value = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise DatasetError("invalid JSON: file is not valid UTF-8", path=shown) from exc
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved with a .json name: read it line by line
            yield from _read_jsonl(p, shown)
            return
        raise DatasetError(
            f"invalid JSON: {exc.msg} (column {exc.colno})", path=shown, line=exc.lineno
        ) from exc
    rows = value.get("data") if isinstance(value, dict) else value
    if not isinstance(rows, list):
        raise DatasetError('a .json dataset must be a list of rows or an object {"data": [rows]}', path=shown)
    for number, item in enumerate(rows, start=1):
        yield number, _as_row(item)


def _batches_to_rows(batches: Iterable[Any]) -> Iterator[tuple[int, Row | RowError]]:
    number = 0
    for batch in batches:
        for item in batch.to_pylist():
            number += 1
            yield number, _as_row(item)


def _read_parquet(p: Path, shown: str | Path) -> Iterator[tuple[int, Row | RowError]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(p)
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"cannot read Parquet file: {exc}", path=shown) from exc
    yield from _batches_to_rows(parquet.iter_batches(batch_size=1024))


def _read_saved_dataset(p: Path, shown: str | Path) -> Iterator[tuple[int, Row | RowError]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(p))
    except Exception as exc:  # datasets raises several unrelated types for broken folders
        raise DatasetError(f"cannot load dataset folder: {exc}", path=shown) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DatasetError(
                f"dataset folder holds splits {sorted(loaded)}; point at one split folder or include 'train'",
                path=shown,
            )
        loaded = loaded["train"]
    loaded = loaded.with_format(None)
    number = 0
    for batch in loaded.iter(batch_size=1024):
        columns = list(batch)
        size = len(batch[columns[0]]) if columns else 0
        for i in range(size):
            number += 1
            yield number, {c: batch[c][i] for c in columns}
