"""Point reads without the per-call cost of the SQL layer: a statement compiled once, run on a DB-API
connection that stays open, its columns decoded by SQLAlchemy's own result processors.

For the hottest read of the API (GET /v1/jobs/{id}), where on 2 cores SQLAlchemy's execution machinery
and a pool checkout per call cost several times the read itself. Same SQL, same Python values.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import namedtuple
from collections.abc import Callable, Mapping
from typing import Any

import orjson
import psycopg
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool
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


class _Dropped(Exception):
    """The connection turned out to be closed by the server (restart, terminated backend, network)."""


class AsyncHeldPool:
    """psycopg connections kept open for point reads from one event loop: autocommit (no BEGIN, nothing to
    roll back on return), no ping before use. A read that finds its connection dropped checks the pool's
    other idle connections, which a server restart has dropped too, and is retried once."""

    def __init__(self, engine: Engine, size: int) -> None:
        _args, params = engine.dialect.create_connect_args(engine.url)  # SQLAlchemy's own URL mapping
        self._kwargs = {**params, "autocommit": True}
        self._size = size
        self._opening: asyncio.Future[AsyncConnectionPool] | None = None

    async def _pool(self) -> AsyncConnectionPool:
        if self._opening is None:  # first read on this loop: open once, however many reads wait for it
            self._opening = asyncio.ensure_future(self._open())
        return await self._opening

    async def _open(self) -> AsyncConnectionPool:
        async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
            set_json_loads(json_loads, conn)  # as the engines decode (make_engine)

        pool = AsyncConnectionPool(
            kwargs=self._kwargs,
            min_size=self._size,
            max_size=self._size,
            open=False,
            name="point-reads",
            configure=configure,
        )
        await pool.open(wait=False)
        return pool

    async def run(self, query: PointQuery, values: Mapping[str, Any]) -> Any:
        """Run `query` and decode its first row (None if there is none)."""
        pool = await self._pool()
        try:
            return await self._run(pool, query, values)
        except _Dropped:
            await pool.check()
            return await self._run(pool, query, values)

    @staticmethod
    async def _run(pool: AsyncConnectionPool, query: PointQuery, values: Mapping[str, Any]) -> Any:
        async with pool.connection() as conn:
            try:
                cursor = await conn.execute(query.sql, query.parameters(values))
                rows = await cursor.fetchall()
            except psycopg.OperationalError as exc:
                if conn.broken:
                    raise _Dropped() from exc
                raise
        return query.decode(rows[0] if rows else None)

    async def close(self) -> None:
        """Close the connections (from the loop that used them)."""
        opening, self._opening = self._opening, None
        if opening is not None:
            await (await opening).close()
