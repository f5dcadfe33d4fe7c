"""Point reads without the SQL layer's per-call cost: statements compiled once, kept connections, same values."""

# For the hottest read of the API (GET /v1/jobs/{id}), where on 2 cores SQLAlchemy's execution machinery
# and a pool checkout per call cost several times the read itself. Same SQL, same Python values: the
# columns are decoded by SQLAlchemy's own result processors.

from __future__ import annotations

import json
import threading
from collections import namedtuple
from collections.abc import Callable, Mapping
from contextlib import closing
from typing import Any

import orjson
from sqlalchemy import Engine, Select
from sqlalchemy.engine import Dialect

# orjson reads integers past 64 bits as floats: text with 19 digits in a row goes to json.loads instead
# (rare: a huge seed, say; a long digit run inside a string takes that path too, with the same result).
# Found by mapping digits to "0" and the rest to " " (at C speed, unlike a regex).
_DIGITS_ONLY = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_RUN = b"0" * 19


def json_loads(text: str | bytes) -> Any:
    """orjson's parser (faster than the standard library's), and json.loads for what orjson refuses or reads
    differently (NaN, Infinity, integers past 64 bits): the values json.loads gives, either way."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if _LONG_RUN in raw.translate(_DIGITS_ONLY):
        return json.loads(text)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


class PointQuery:
    """A SELECT compiled for one dialect: its SQL text, how to order parameters, how to decode a row."""

    def __init__(self, statement: Select[Any], dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self._constants = dict(compiled.params)  # the statement's own bound literals, e.g. 'queued'
        self._positions: tuple[str, ...] | None = (
            tuple(compiled.positiontup) if compiled.positional and compiled.positiontup else None
        )
        columns = list(statement.selected_columns)
        processors = [column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns]
        self._processors: list[tuple[int, Callable[[Any], Any]]] = [
            (i, process) for i, process in enumerate(processors) if process is not None
        ]
        self.row_type = namedtuple("PointRow", [column.key for column in columns])  # type: ignore[misc]

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...] | Mapping[str, Any]:
        """The driver's parameters: positional (SQLite's `?`) or named (psycopg's `%(name)s`)."""
        merged = {**self._constants, **values}
        if self._positions is None:
            return merged
        return tuple(merged[name] for name in self._positions)

    def decode(self, raw: tuple[Any, ...] | None) -> Any:
        """The driver's row as a named tuple of the values SQLAlchemy would return, or None."""
        if raw is None:
            return None
        values = list(raw)
        for i, process in self._processors:
            values[i] = process(values[i])
        return self.row_type._make(values)


class HeldConnections:
    """A DB-API connection kept by the first thread that reads (the event loop's); other threads check
    one out of `engine`'s pool per read and give it back."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._owner: int | None = None
        self._held: Any = None  # the owner's pool connection
        self._lock = threading.Lock()

    def _claim(self) -> Any | None:
        """The held connection if this thread owns it (or now claims it), else None."""
        me = threading.get_ident()
        if self._owner == me:
            return self._held
        with self._lock:
            if self._owner is None:
                self._held = self.engine.raw_connection()
                self._owner = me
                return self._held
        return None

    def run(self, query: PointQuery, values: Mapping[str, Any]) -> Any:
        """Run `query` and decode its first row (None if there is none). Fetches every row, so SQLite
        resets the statement and holds no read snapshot between calls (autocommit: no transaction)."""
        held = self._claim()
        if held is not None:
            return self._run(held, query, values)
        with closing(self.engine.raw_connection()) as borrowed:
            return self._run(borrowed, query, values)

    @staticmethod
    def _run(fairy: Any, query: PointQuery, values: Mapping[str, Any]) -> Any:
        rows = fairy.driver_connection.execute(query.sql, query.parameters(values)).fetchall()
        return query.decode(rows[0] if rows else None)

    def in_transaction(self) -> bool:
        """Whether the held connection has a transaction open (never, after a read: for tests)."""
        return bool(self._held is not None and self._held.driver_connection.in_transaction)

    def close(self) -> None:
        """Give the held connection back to the pool (the owner's shutdown); the next read claims anew."""
        with self._lock:
            held, self._held, self._owner = self._held, None, None
        if held is not None:
            held.close()
