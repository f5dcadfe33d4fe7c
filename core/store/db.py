"""Engine and session factory from a database URL (SQLite: WAL, busy_timeout, foreign keys, BEGIN IMMEDIATE)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
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
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_file(parsed)
        if path is not None:
            path.expanduser().parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        connect_args.update(kwargs.pop("connect_args", {}))
        engine = create_engine(parsed, connect_args=connect_args, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
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
        self._write_factory = sessionmaker(writer, expire_on_commit=False)

    @property
    def url(self) -> URL:
        return self.engine.url

    def session(self) -> Session:
        """A plain session (deferred transactions); the caller commits and closes it."""
        return self._read_factory()

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
        """Close every pooled connection."""
        self.engine.dispose()
