"""Error types of the data layer: fatal DatasetError and per-row RowError with a short kind code."""

from __future__ import annotations

from pathlib import Path
from typing import Final

INVALID_JSON: Final = "invalid_json"
MISSING_FIELD: Final = "missing_field"
EMPTY_FIELD: Final = "empty_field"
IDENTICAL: Final = "identical"
WRONG_SHAPE: Final = "wrong_shape"
NO_ROOM: Final = "no_room"

ROW_ERROR_KINDS: Final = (INVALID_JSON, MISSING_FIELD, EMPTY_FIELD, IDENTICAL, WRONG_SHAPE, NO_ROOM)

# Kinds of a fatal DatasetError for a file over a DataLimits limit (the API answers 413 and 422).
TOO_LARGE: Final = "too_large"
LINE_TOO_LONG: Final = "line_too_long"


class RowError(ValueError):
    """One row cannot be used. ``reason`` is the human message, ``kind`` one of ROW_ERROR_KINDS."""

    def __init__(self, reason: str, kind: str = WRONG_SHAPE) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind

    def __repr__(self) -> str:
        return f"RowError({self.reason!r}, kind={self.kind!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RowError) and (self.reason, self.kind) == (other.reason, other.kind)

    def __hash__(self) -> int:
        return hash((self.reason, self.kind))

    def __reduce__(self) -> tuple[type[RowError], tuple[str, str]]:
        return (RowError, (self.reason, self.kind))


class DatasetError(ValueError):
    """A fatal data problem; the message names the file and, where known, the line.

    ``str(err)`` reads like ``data.jsonl line 17: missing field 'rejected'``.
    """

    def __init__(
        self, reason: str, *, path: str | Path | None = None, line: int | None = None, kind: str | None = None
    ) -> None:
        self.path = str(path) if path is not None else None
        self.line = line
        self.reason = reason
        self.kind = kind
        super().__init__(self._message())

    def _message(self) -> str:
        where = self.path or ""
        if self.line is not None:
            where = f"{where} line {self.line}" if where else f"line {self.line}"
        return f"{where}: {self.reason}" if where else self.reason

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_dataset_error, (self.reason, self.path, self.line, self.kind))

    @classmethod
    def from_row(cls, error: RowError, *, path: str | Path | None, line: int) -> DatasetError:
        return cls(error.reason, path=path, line=line, kind=error.kind)


def _rebuild_dataset_error(reason: str, path: str | None, line: int | None, kind: str | None) -> DatasetError:
    return DatasetError(reason, path=path, line=line, kind=kind)
