"""Point reads from the event loop on PostgreSQL: held psycopg connections, one query per loop turn's reads."""

# The reads of one loop turn go out as one `key = ANY(...)` query: one checkout, one round trip, one
# backend wake-up for all of them.

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Iterable, Mapping
from typing import Any

import psycopg
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool
from sqlalchemy import Engine

from core.store.point_reads import PointQuery, json_loads


class _Dropped(Exception):
    """The connection turned out to be closed by the server (restart, terminated backend, network)."""


# How long a read waits for a connection (e.g. while PostgreSQL is down) before it fails.
CHECKOUT_TIMEOUT_S = 5.0


class AsyncHeldPool:
    """psycopg connections kept open for point reads from one event loop: autocommit (no BEGIN, nothing to
    roll back on return), no ping before use. A read that finds its connection dropped checks the pool's
    other idle connections, which a server restart has dropped too, and is retried once.

    Connection parameters come from the engine's URL (what `create_connect_args` makes of it); an
    engine's `connect_args` or connect hooks do not reach this pool."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, min_size: int, max_size: int) -> None:
        _args, params = engine.dialect.create_connect_args(engine.url)  # SQLAlchemy's own URL mapping
        self.loop = loop
        self._kwargs = {**params, "autocommit": True}
        self._sizes = (min_size, max_size)
        self._opening: asyncio.Future[AsyncConnectionPool] | None = None
        self._batches: dict[tuple[PointQuery, str], KeyBatch] = {}

    async def _pool(self) -> AsyncConnectionPool:
        if self._opening is None:  # first read on this loop: open once, however many reads wait for it
            self._opening = asyncio.ensure_future(self._open())
        try:
            return await self._opening
        except Exception:
            self._opening = None  # the next read tries again
            raise

    async def _open(self) -> AsyncConnectionPool:
        async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
            set_json_loads(json_loads, conn)  # as the engines decode (make_engine)

        pool = AsyncConnectionPool(
            kwargs=self._kwargs,
            min_size=self._sizes[0],
            max_size=self._sizes[1],
            open=False,
            name="point-reads",
            configure=configure,
            timeout=CHECKOUT_TIMEOUT_S,
        )
        await pool.open(wait=False)
        return pool

    async def fetch(self, query: PointQuery, values: Mapping[str, Any]) -> list[Any]:
        """Run `query` and decode every row."""
        pool = await self._pool()
        try:
            return await self._fetch(pool, query, values)
        except _Dropped:
            await pool.check()
            return await self._fetch(pool, query, values)

    @staticmethod
    async def _fetch(pool: AsyncConnectionPool, query: PointQuery, values: Mapping[str, Any]) -> list[Any]:
        async with pool.connection() as conn:
            try:
                cursor = await conn.execute(query.sql, query.parameters(values))
                rows = await cursor.fetchall()
            except psycopg.OperationalError as exc:
                if conn.broken:
                    raise _Dropped() from exc
                raise
        return [query.decode(row) for row in rows]

    def batch(self, query: PointQuery, key: str) -> KeyBatch:
        """The coalescing reader of `query` (whose `keys` parameter is the list of `key` values to read)."""
        found = self._batches.get((query, key))
        if found is None:
            found = self._batches[(query, key)] = KeyBatch(self, query, key)
        return found

    async def close(self) -> None:
        """Close the connections (from the loop that used them)."""
        opening, self._opening = self._opening, None
        if opening is not None:
            await (await opening).close()


class KeyBatch:
    """Reads rows by key; every key asked for during one turn of the event loop goes out in one query.

    Under load, requests that become ready together share a round trip instead of paying one each
    (Python overhead and a backend wake-up each); a lone read waits one loop turn."""

    def __init__(self, reads: AsyncHeldPool, query: PointQuery, key: str) -> None:
        self._reads = reads
        self._query = query
        self._key = key
        self._waiting: dict[Any, list[asyncio.Future[Any]]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self.queries = 0  # how many queries served the reads so far (what the coalescing saves)

    async def get(self, key: Any) -> Any:
        """The row whose key is `key`, or None."""
        loop = asyncio.get_running_loop()
        if not self._waiting:
            loop.call_soon(self._flush)  # after the reads that this loop turn has already queued
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.setdefault(key, []).append(future)
        return await future

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, {}
        # A context of its own: the batch serves many requests, so it must not log under one's id.
        task = asyncio.get_running_loop().create_task(self._run(waiting), context=contextvars.Context())
        self._running.add(task)  # a reference until it is done
        task.add_done_callback(self._running.discard)

    async def _run(self, waiting: dict[Any, list[asyncio.Future[Any]]]) -> None:
        try:
            found = await self._read(list(waiting))
        except asyncio.CancelledError:
            _cancel(waiting.values())
            raise
        except Exception as exc:
            if len(waiting) == 1:
                _fail(next(iter(waiting.values())), exc)
                return
            # One bad key must not fail the other readers (another project's requests, say): each key
            # on its own, so every reader gets its own row or its own error.
            for key, futures in waiting.items():
                try:
                    one = await self._read([key])
                except asyncio.CancelledError:
                    _cancel(waiting.values())
                    raise
                except Exception as own:
                    _fail(futures, own)
                else:
                    _resolve(futures, one.get(key))
            return
        for key, futures in waiting.items():
            _resolve(futures, found.get(key))

    async def _read(self, keys: list[Any]) -> dict[Any, Any]:
        self.queries += 1
        rows = await self._reads.fetch(self._query, {"keys": keys})
        return {getattr(row, self._key): row for row in rows}


def _cancel(groups: Iterable[list[asyncio.Future[Any]]]) -> None:
    for futures in groups:
        for future in futures:
            future.cancel()  # a no-op on the ones already resolved


def _fail(futures: list[asyncio.Future[Any]], exc: Exception) -> None:
    for future in futures:
        if not future.done():  # a reader whose request was cancelled meanwhile
            future.set_exception(exc)


def _resolve(futures: list[asyncio.Future[Any]], row: Any) -> None:
    for future in futures:
        if not future.done():
            future.set_result(row)
