"""Dataset uploads: stream to disk with a running SHA-256, pick the file type, check rows with core.data."""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from core.data.errors import DatasetError, RowError
from core.data.formats import check_row
from core.data.limits import DEFAULT_LIMITS, DataLimits
from core.data.readers import read_rows

SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".ndjson", ".json", ".parquet")
MAX_LISTED_ERRORS = 100
_CHUNK = 1024 * 1024
TEMP_PREFIX = ".upload-"
STALE_UPLOAD_S = 3600.0  # a temporary upload untouched this long is an orphan, whoever made it


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
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(), dir=folder)
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


def _temp_prefix() -> str:
    """`.upload-<host>-<pid>-`: start-up clean-up tells a dead process's file from a live upload's."""
    host = "".join(c for c in socket.gethostname() if c.isalnum())[:40] or "host"
    return f"{TEMP_PREFIX}{host}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _orphaned(path: Path, host: str, now: float) -> bool:
    parts = path.name[len(TEMP_PREFIX) :].split("-", 2)
    if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and int(parts[1]) != os.getpid():
        return not _pid_alive(int(parts[1]))
    return now - path.stat().st_mtime > STALE_UPLOAD_S


def remove_orphaned_uploads(folder: Path) -> list[Path]:
    """Delete temporary upload files that no upload will finish; returns what was removed.

    Run at start-up: a file made on this host by a process that is gone (a killed server) is removed at
    once; any other (another host sharing the folder, an old name) once untouched for STALE_UPLOAD_S.
    A live upload, of this process or another server's, is left alone.
    """
    if not folder.is_dir():
        return []
    host = _temp_prefix()[len(TEMP_PREFIX) :].split("-", 1)[0]
    now, removed = time.time(), []
    for path in folder.glob(f"{TEMP_PREFIX}*"):
        try:
            if path.is_file() and _orphaned(path, host, now):
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # finished or removed meanwhile
            continue
    return removed


def check_rows(path: Path, limits: DataLimits = DEFAULT_LIMITS) -> UploadCheck:
    """Read every row and apply the loop's row checks that need no tokenizer (core.data.formats.check_row).

    As in the loop's auto mode, the first usable row fixes the format for the rest. Counts usable rows
    and lists the first bad lines; DatasetError if the file is unreadable or over ``limits``.
    """
    check = UploadCheck()
    locked: str | None = None
    for line, row in read_rows(path, limits):
        check.rows_total += 1
        try:
            if isinstance(row, RowError):
                raise row
            fmt, _ = check_row(row, locked or "auto")
            locked = fmt
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


def checked_copy(upload: Upload, limits: DataLimits = DEFAULT_LIMITS) -> tuple[Path, UploadCheck]:
    """Give the temp file the suffix the reader needs, check it; the caller finalises or deletes it."""
    named = upload.tmp_path.with_name(upload.tmp_path.name + upload.suffix)
    os.replace(upload.tmp_path, named)
    upload.tmp_path = named
    try:
        return named, check_rows(named, limits)
    except DatasetError:
        raise
    except (OSError, ValueError) as exc:  # a reader choking on a file that is not what it claims to be
        raise DatasetError(f"cannot read the uploaded file as {upload.suffix}: {exc}") from exc
