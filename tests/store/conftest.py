"""Store-suite fixtures: each test runs on SQLite (a temp file) and on PostgreSQL (a temporary database)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.pool import NullPool

from core.store import migrate
from core.store.db import Database, make_engine, normalize_url
from core.store.models import Base
from tests.webhook_receiver import receiver  # noqa: F401 (fixture)

PG_ADMIN_URL = os.environ.get(
    "MINORDPO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@cache
def _pg_unreachable() -> str | None:
    """None if the PostgreSQL admin URL answers, else why not."""
    engine = make_engine(PG_ADMIN_URL, poolclass=NullPool, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver/network error means "not reachable"
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    finally:
        engine.dispose()
    return None


def require_postgres() -> None:
    """Skip (locally) or fail (CI=true) when the PostgreSQL server is unreachable."""
    reason = _pg_unreachable()
    if reason is None:
        return
    shown = normalize_url(PG_ADMIN_URL).render_as_string(hide_password=True)
    message = f"PostgreSQL at {shown} (MINORDPO_TEST_POSTGRES_URL) is unreachable: {reason}"
    if IN_CI:
        pytest.fail(f"CI=true requires the PostgreSQL tests to run: {message}", pytrace=False)
    pytest.skip(message)


@contextmanager
def temporary_pg_database() -> Iterator[str]:
    """Create a uniquely named empty database on the test server; drop it afterwards."""
    require_postgres()
    name = f"minordpo_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(PG_ADMIN_URL, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = normalize_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        try:
            yield url
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@contextmanager
def empty_database(backend: str, tmp_dir: Path) -> Iterator[str]:
    """An empty database URL of the given backend."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_dir / f'store-{uuid.uuid4().hex[:8]}.db'}"
    else:
        with temporary_pg_database() as url:
            yield url


@pytest.fixture(scope="session", params=BACKENDS)
def migrated_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database migrated to head, shared by the session (tables are emptied after each test)."""
    with empty_database(request.param, tmp_path_factory.mktemp("db")) as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture
def db(migrated_url: str) -> Iterator[Database]:
    """A Database on the migrated schema; every table is emptied after the test."""
    database = Database(migrated_url)
    try:
        yield database
    finally:
        with database.engine.begin() as conn:
            tables = list(reversed(Base.metadata.sorted_tables))
            if conn.dialect.name == "postgresql":
                conn.execute(
                    text("TRUNCATE " + ", ".join(t.name for t in tables) + " RESTART IDENTITY CASCADE")
                )
            else:
                for table in tables:
                    conn.execute(table.delete())
        database.dispose()


@pytest.fixture(params=BACKENDS)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, never migrated database (for the migration tests)."""
    with empty_database(request.param, tmp_path) as url:
        yield url
