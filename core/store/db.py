"""Engine and session factory from a database URL (SQLite: WAL, busy_timeout, foreign keys, BEGIN IMMEDIATE)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Select, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from core.store.async_reads import AsyncHeldPool
from core.store.point_reads import HeldConnections, PointQuery, json_loads

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Connections kept open per engine, and extra ones opened (and closed again) under bursts. SQLAlchemy's 5
# were too few for the API's thread pool: each request past them opened its own connection, which on
# SQLite re-runs the pragmas and on PostgreSQL starts a backend process. PostgreSQL's budget: an API
# process holds at most POOL_SIZE + MAX_OVERFLOW in its sync engine plus POOL_SIZE for the event loop's
# point reads; the dispatcher and each job's driver POOL_SIZE + MAX_OVERFLOW (docs/deployment.md).
POOL_SIZE = 10
MAX_OVERFLOW = 10
_BEGIN_OPTION = "minordpo_sqlite_begin"


def normalize_url(url: str | URL) -> URL:
    """Parse `url`; a bare ``postgresql://`` / ``postgres://`` URL gets the psycopg 3 driver we ship."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def sqlite_file(url: str | URL) -> Path | None:
    """The database file of a SQLite URL (relative to the current directory), or None (memory / not SQLite)."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:") or parsed.query.get("mode") == "memory":
        return None
    return Path(database)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # SQLAlchemy emits BEGIN itself (below); pysqlite's own implicit BEGIN would be DEFERRED.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An Engine for `url`; SQLite files get their parent folder created and the pragmas of this module."""
    parsed = normalize_url(url)
    pooled = parsed.get_backend_name() != "sqlite" or sqlite_file(parsed) is not None  # not :memory:
    if pooled and "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", POOL_SIZE)
        kwargs.setdefault("max_overflow", MAX_OVERFLOW)
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_file(parsed)
        if path is not None:
            path.expanduser().parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        connect_args.update(kwargs.pop("connect_args", {}))
        kwargs.setdefault("json_deserializer", json_loads)
        engine = create_engine(parsed, connect_args=connect_args, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("json_deserializer", json_loads)
    return create_engine(parsed, **kwargs)


class Database:
    """An engine plus session factories; the unit of work is one `write()` or `read()` block.

    Store functions never commit: they run inside the caller's transaction. Use `write()` for any
    unit of work that writes: on SQLite it starts with ``BEGIN IMMEDIATE`` so read-then-write code
    cannot fail with "database is locked" half-way; on PostgreSQL it is an ordinary transaction.
    """

    def __init__(self, url_or_engine: str | URL | Engine, **engine_kwargs: Any) -> None:
        self.engine = (
            url_or_engine
            if isinstance(url_or_engine, Engine)
            else make_engine(url_or_engine, **engine_kwargs)
        )
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        writer = (
            self.engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"}) if self.is_sqlite else self.engine
        )
        self._read_factory = sessionmaker(self.engine, expire_on_commit=False)
        self._point_engine: Engine | None = None
        self._held: HeldConnections | None = None
        self._point_queries: dict[Select[Any], PointQuery] = {}
        self._reads: AsyncHeldPool | None = None
        if self.is_sqlite and sqlite_file(self.engine.url) is not None:
            # A pool of its own for the point reads on the event loop: the loop keeps one connection
            # (autocommit: each statement reads its own snapshot) and never waits for one that the
            # thread pool's requests hold; other threads borrow from the overflow.
            self._point_engine = make_engine(self.engine.url, pool_size=1, max_overflow=4)
            self._held = HeldConnections(self._point_engine)
        self._write_factory = sessionmaker(writer, expire_on_commit=False)

    @property
    def url(self) -> URL:
        return self.engine.url

    def _async_reads(self) -> AsyncHeldPool:
        """PostgreSQL connections for point reads on the running event loop, made on its first read (a
        pool is bound to its loop: another loop, e.g. a second app in a test process, gets its own).
        The reads of one loop turn share a query, so a few connections are plenty."""
        loop = asyncio.get_running_loop()
        reads = self._reads
        if reads is None or reads.loop is not loop:
            reads = self._reads = AsyncHeldPool(self.engine, loop, min_size=2, max_size=POOL_SIZE)
        return reads

    def session(self) -> Session:
        """A plain session (deferred transactions); the caller commits and closes it."""
        return self._read_factory()

    def read_point(self, statement: Select[Any], values: Mapping[str, Any]) -> Any:
        """The first row of a prebuilt `statement` (None if none), for one short read on the event loop.
        On a SQLite file it runs on a connection this thread keeps open, without SQLAlchemy's per-call
        machinery; elsewhere on a pooled connection."""
        if self._held is None:
            with self.engine.connect() as conn:
                return conn.execute(statement, values).first()
        return self._held.run(self._point_query(statement), values)

    async def read_by_key(self, statement: Select[Any], key: str, value: Any) -> Any:
        """The row of `statement` (which selects `WHERE key = ANY(:keys)`) whose `key` column is `value`, or
        None; from the event loop on PostgreSQL, where the reads of one loop turn share a query."""
        if self.is_sqlite:
            raise RuntimeError("batched reads need PostgreSQL: read SQLite inline with read_point")
        return await self._async_reads().batch(self._point_query(statement), key).get(value)

    def _point_query(self, statement: Select[Any]) -> PointQuery:
        query = self._point_queries.get(statement)  # statements hash by identity: the prebuilt ones
        if query is None:
            query = self._point_queries[statement] = PointQuery(statement, self.engine.dialect)
        return query

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reads; closed at the end of the block (nothing is committed; loaded
        objects stay readable, detached)."""
        with self._read_factory() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction: committed at the end of the block, rolled back on an exception."""
        with self._write_factory() as session, session.begin():
            yield session

    def dispose(self) -> None:
        """Close every pooled connection of the sync engines (see `close_async_reads` for the async ones)."""
        self.engine.dispose()
        if self._held is not None:
            self._held.close()
        if self._point_engine is not None:
            self._point_engine.dispose()

    async def close_async_reads(self) -> None:
        """Close the async point-read connections, from the event loop that used them (the app's shutdown)."""
        reads, self._reads = self._reads, None
        if reads is not None and reads.loop is asyncio.get_running_loop():
            await reads.close()
