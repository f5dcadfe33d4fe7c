"""Dataset uploads: stream to disk with a running SHA-256, pick the file type, check rows with core.data."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from core.data.errors import DatasetError, RowError
from core.data.formats import detect_format, normalise
from core.data.readers import read_rows

SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".ndjson", ".json", ".parquet")
MAX_LISTED_ERRORS = 100
_CHUNK = 1024 * 1024


@dataclass
class Upload:
    """A received upload, still in its temporary file."""

    tmp_path: Path
    sha256: str
    size: int
    filename: str
    suffix: str


@dataclass
class UploadCheck:
    """What the row check found: counts, the dominant format and the first bad lines."""

    rows_total: int = 0
    rows_valid: int = 0
    rows_invalid: int = 0
    formats: Counter[str] = field(default_factory=Counter)
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def format(self) -> str:
        return self.formats.most_common(1)[0][0] if self.formats else "unknown"

    def as_report(self) -> dict[str, Any]:
        return {
            "rows_total": self.rows_total,
            "rows_valid": self.rows_valid,
            "rows_invalid": self.rows_invalid,
            "formats": dict(self.formats),
            "errors": self.errors,
            "errors_truncated": self.rows_invalid > len(self.errors),
        }


def safe_filename(name: str | None) -> str:
    """The last path component of a client-given name, printable and short (never used as a path)."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(c for c in base if c.isprintable() and c not in "\"'<>|")[:200]
    return cleaned or "upload"


def suffix_for(filename: str, head: bytes) -> str:
    """The reader suffix: from the filename when it has a known one, else sniffed from the first bytes."""
    lower = filename.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix):
            return ".jsonl" if suffix == ".ndjson" else suffix
    if head.startswith(b"\x1f\x8b"):
        return ".jsonl.gz"
    if head.startswith(b"PAR1"):
        return ".parquet"
    if head.lstrip()[:1] == b"[":
        return ".json"
    return ".jsonl"


class _Sink:
    """A temporary file in the datasets folder that hashes what it is given."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".upload-", dir=folder)
        self.path = Path(name)
        self.fh: IO[bytes] = os.fdopen(fd, "wb")
        self.digest = hashlib.sha256()
        self.size = 0
        self.head = b""

    def write(self, chunk: bytes) -> None:
        if len(self.head) < 64:
            self.head += chunk[: 64 - len(self.head)]
        self.digest.update(chunk)
        self.fh.write(chunk)
        self.size += len(chunk)

    def finish(self, filename: str | None) -> Upload:
        """Close the file and describe what was received."""
        self.fh.close()
        name = safe_filename(filename)
        return Upload(self.path, self.digest.hexdigest(), self.size, name, suffix_for(name, self.head))

    def discard(self) -> None:
        self.fh.close()
        self.path.unlink(missing_ok=True)


async def receive_stream(chunks: AsyncIterator[bytes], folder: Path, filename: str | None) -> Upload:
    """Write an async byte stream (a raw request body) to a temporary file."""
    sink = _Sink(folder)
    try:
        async for chunk in chunks:
            if chunk:
                sink.write(chunk)
    except BaseException:
        sink.discard()
        raise
    return sink.finish(filename)


def receive_file(source: IO[bytes], folder: Path, filename: str | None) -> Upload:
    """Copy a file object (a multipart part already spooled by the parser) to a temporary file."""
    sink = _Sink(folder)
    try:
        while chunk := source.read(_CHUNK):
            sink.write(chunk)
    except BaseException:
        sink.discard()
        raise
    return sink.finish(filename)


def check_rows(path: Path) -> UploadCheck:
    """Read every row; count usable ones per format and list the first bad lines (DatasetError if unreadable)."""
    check = UploadCheck()
    for line, row in read_rows(path):
        check.rows_total += 1
        try:
            if isinstance(row, RowError):
                raise row
            fmt = detect_format(row)
            if fmt in ("standard", "implicit_prompt"):
                normalise(row, fmt)
        except RowError as err:
            check.rows_invalid += 1
            if len(check.errors) < MAX_LISTED_ERRORS:
                check.errors.append({"line": line, "msg": err.reason, "kind": err.kind})
            continue
        check.formats[fmt] += 1
        check.rows_valid += 1
    return check


def finalise(upload: Upload, folder: Path) -> Path:
    """Move the temporary file to its content-addressed name (`<sha256><suffix>`); reuse an existing copy."""
    target = folder / f"{upload.sha256}{upload.suffix}"
    if target.exists():
        upload.tmp_path.unlink(missing_ok=True)
    else:
        os.replace(upload.tmp_path, target)
    return target


def checked_copy(upload: Upload) -> tuple[Path, UploadCheck]:
    """Give the temp file the suffix the reader needs, check it; the caller finalises or deletes it."""
    named = upload.tmp_path.with_name(upload.tmp_path.name + upload.suffix)
    os.replace(upload.tmp_path, named)
    upload.tmp_path = named
    try:
        return named, check_rows(named)
    except DatasetError:
        raise
    except (OSError, ValueError) as exc:  # a reader choking on a file that is not what it claims to be
        raise DatasetError(f"cannot read the uploaded file as {upload.suffix}: {exc}") from exc
