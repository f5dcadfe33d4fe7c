"""Point reads without the per-call cost of the SQL layer: a statement compiled once, run on a DB-API
connection that stays open, its columns decoded by SQLAlchemy's own result processors.

For the hottest read of the API (GET /v1/jobs/{id}), where on 2 cores SQLAlchemy's execution machinery
and a pool checkout per call cost several times the read itself. Same SQL, same Python values.
"""

from __future__ import annotations

import json
import threading
from collections import namedtuple
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from sqlalchemy import Engine, Select
from sqlalchemy.engine import Dialect


def json_loads(text: str | bytes) -> Any:
    """orjson's parser (3x the standard library's here), and json.loads for what orjson refuses but
    Python's json writes (NaN, Infinity, integers past 64 bits): the same values either way."""
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
    """One DB-API connection per thread, checked out of `engine`'s pool once and kept (the event loop's)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._local = threading.local()
        self._held: list[Any] = []
        self._lock = threading.Lock()

    def get(self) -> Any:
        """This thread's driver connection (SQLite: autocommit, so no statement leaves a transaction open)."""
        fairy = getattr(self._local, "fairy", None)
        if fairy is None:
            fairy = self.engine.raw_connection()
            with self._lock:
                self._held.append(fairy)
            self._local.fairy = fairy
        return fairy.driver_connection

    def run(self, query: PointQuery, values: Mapping[str, Any]) -> Any:
        """Run `query` and decode its first row (None if there is none). Fetches every row, so SQLite
        resets the statement and holds no read snapshot between calls."""
        rows = self.get().execute(query.sql, query.parameters(values)).fetchall()
        return query.decode(rows[0] if rows else None)

    def close(self) -> None:
        """Give every held connection back to the pool (call from the owner's shutdown)."""
        with self._lock:
            held, self._held = self._held, []
        self._local = threading.local()
        for fairy in held:
            fairy.close()
