"""Read raw rows from .jsonl/.jsonl.gz/.json/.parquet files and datasets.load_from_disk folders."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from core.data.errors import INVALID_JSON, LINE_TOO_LONG, TOO_LARGE, WRONG_SHAPE, DatasetError, RowError
from core.data.limits import DEFAULT_LIMITS, DataLimits, json_depth, too_deep_line

SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")

Row = dict[str, Any]
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_JSON_LINES = object()


def read_rows(path: str | Path, limits: DataLimits = DEFAULT_LIMITS) -> Iterator[tuple[int, Row | RowError]]:
    """Yield ``(line, row)`` pairs; ``line`` is the 1-based source line (JSONL) or row number.

    A JSONL line that is not valid JSON, is nested deeper than ``limits.max_json_depth``, or is valid
    JSON but not an object, yields a RowError for that line instead of raising. Blank JSONL lines are
    not rows and are passed over (their line numbers still count). A missing path, an unsupported
    suffix or a whole file that cannot be read raise DatasetError naming the path; so do a file over
    ``limits`` (kind TOO_LARGE: decompressed size, .json size) and a line over ``max_line_bytes``
    (kind LINE_TOO_LONG, naming the line). Limits are checked while reading: nothing over them is held.
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
        return _read_jsonl(p, path, limits)
    if name.endswith((".json", ".json.gz")):
        return _read_json(p, path, limits)
    if name.endswith(".parquet"):
        return _read_parquet(p, path, limits)
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


def _too_deep(limit: int) -> RowError:
    return RowError(f"invalid JSON: nested deeper than {limit} levels", INVALID_JSON)


def _parse_line(
    raw: bytes, first: bool = False, max_depth: int = DEFAULT_LIMITS.max_json_depth
) -> Row | RowError:
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")  # tolerate a byte-order mark
    except UnicodeDecodeError as exc:
        return RowError(f"invalid JSON: not valid UTF-8 at byte {exc.start}", INVALID_JSON)
    if json_depth(raw, max_depth) > max_depth:  # json.loads recurses per level: never hand it a deep row
        return _too_deep(max_depth)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return RowError(f"invalid JSON: {exc.msg} (column {exc.colno})", INVALID_JSON)
    except RecursionError:
        return _too_deep(max_depth)
    return _as_row(value)


class _Budget:
    """Counts the decompressed bytes read from one file against ``max_dataset_bytes``."""

    def __init__(self, limits: DataLimits, shown: str | Path) -> None:
        self.limit = limits.max_dataset_bytes
        self.used = 0
        self.shown = shown

    def take(self, size: int) -> None:
        self.used += size
        if self.used > self.limit:
            raise too_large(self.shown, self.limit, "max_dataset_bytes", "once decompressed")


def too_large(shown: str | Path, limit: int, setting: str, what: str) -> DatasetError:
    """The DatasetError for a file over a size limit (the API answers 413)."""
    return DatasetError(
        f"the file is larger than {limit} bytes {what} (limit MINORDPO_{setting.upper()})",
        path=shown,
        kind=TOO_LARGE,
    )


def _read_jsonl(
    p: Path, shown: str | Path, limits: DataLimits = DEFAULT_LIMITS
) -> Iterator[tuple[int, Row | RowError]]:
    budget = _Budget(limits, shown)
    longest = limits.max_line_bytes
    try:
        with _open_binary(p) as fh:
            lineno = 0
            while raw := fh.readline(longest + 1):  # bounded: an endless line is never read whole
                lineno += 1
                budget.take(len(raw))
                if len(raw) > longest and not raw.endswith(b"\n"):
                    raise DatasetError(
                        f"line is longer than {longest} bytes (limit MINORDPO_MAX_LINE_BYTES)",
                        path=shown,
                        line=lineno,
                        kind=LINE_TOO_LONG,
                    )
                if lineno == 1 and raw.startswith(_UTF16_BOMS):
                    raise DatasetError("the file is UTF-16 encoded; save it as UTF-8", path=shown, line=1)
                if raw.strip():
                    yield lineno, _parse_line(raw, lineno == 1, limits.max_json_depth)
    except (OSError, EOFError, zlib.error) as exc:  # gzip corruption, permission problems
        raise DatasetError(f"cannot read file: {exc}", path=shown) from exc


def _read_whole(p: Path, shown: str | Path, cap: int) -> bytes:
    try:
        with _open_binary(p) as fh:
            return fh.read(cap + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"cannot read file: {exc}", path=shown) from exc


def _starts_as_json_lines(raw: bytes, limits: DataLimits) -> bool:
    """Whether the first line of ``raw`` is a whole JSON object on its own (JSON Lines with a .json name)."""
    end = raw.find(b"\n", 0, limits.max_line_bytes + 1)
    if end <= 0:
        return False
    row = _parse_line(raw[:end], first=True, max_depth=limits.max_json_depth)
    return isinstance(row, dict)


def _read_json(
    p: Path, shown: str | Path, limits: DataLimits = DEFAULT_LIMITS
) -> Iterator[tuple[int, Row | RowError]]:
    cap = min(limits.max_json_bytes, limits.max_dataset_bytes)
    raw = _read_whole(p, shown, cap)
    if len(raw) > cap:  # parsed in memory, so a whole .json file is bounded; JSON Lines are streamed
        lines = _starts_as_json_lines(raw, limits)
        del raw
        if not lines:
            setting = "max_json_bytes" if cap == limits.max_json_bytes else "max_dataset_bytes"
            raise too_large(shown, cap, setting, "(a .json file is parsed whole; use JSON Lines for more)")
        yield from _read_jsonl(p, shown, limits)
        return
    depth = limits.max_json_depth + 2  # the list, and {"data": ...}, around the rows
    if json_depth(raw, depth) > depth:
        too_deep = _too_deep(limits.max_json_depth).reason
        raise DatasetError(too_deep, path=shown, line=too_deep_line(raw, depth), kind=INVALID_JSON)
    try:
        value = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise DatasetError("invalid JSON: file is not valid UTF-8", path=shown) from exc
    except RecursionError as exc:
        raise DatasetError(_too_deep(limits.max_json_depth).reason, path=shown) from exc
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":
            raise DatasetError(
                f"invalid JSON: {exc.msg} (column {exc.colno})", path=shown, line=exc.lineno
            ) from exc
        value = _JSON_LINES  # JSON Lines saved with a .json name: read it line by line
    del raw
    if value is _JSON_LINES:
        yield from _read_jsonl(p, shown, limits)
        return
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


def _read_parquet(
    p: Path, shown: str | Path, limits: DataLimits = DEFAULT_LIMITS
) -> Iterator[tuple[int, Row | RowError]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(p)
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"cannot read Parquet file: {exc}", path=shown) from exc
    meta = parquet.metadata
    if sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) > limits.max_dataset_bytes:
        raise too_large(shown, limits.max_dataset_bytes, "max_dataset_bytes", "once decompressed")
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
