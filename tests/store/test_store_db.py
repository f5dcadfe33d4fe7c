"""Engine set-up: SQLite pragmas, parent folders for relative paths, URL normalisation, BEGIN IMMEDIATE."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from core.store.db import Database, make_engine, normalize_url, sqlite_file


def test_sqlite_pragmas(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30_000
    engine.dispose()


def test_relative_sqlite_path_gets_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    engine = make_engine("sqlite:///var/nested/minordpo.db")
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    engine.dispose()
    assert (tmp_path / "var" / "nested" / "minordpo.db").is_file()
    assert sqlite_file("sqlite:///var/x.db") == Path("var/x.db")
    assert sqlite_file("sqlite://") is None
    assert sqlite_file("postgresql://u@h/db") is None


def test_postgres_urls_get_the_psycopg_driver() -> None:
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"


def test_sqlite_write_blocks_begin_immediately(tmp_path: Path) -> None:
    """A second writer waits at BEGIN (not half-way), so read-then-write units never hit SQLITE_BUSY."""
    db = Database(f"sqlite:///{tmp_path / 'w.db'}")
    with db.engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (v INTEGER)"))
    order: list[str] = []
    holding = threading.Event()

    def first() -> None:
        with db.write() as s:
            s.execute(text("SELECT count(*) FROM t"))
            holding.set()
            time.sleep(0.3)
            s.execute(text("INSERT INTO t VALUES (1)"))
            order.append("first")

    thread = threading.Thread(target=first)
    thread.start()
    holding.wait(5)
    with db.write() as s:
        n = s.execute(text("SELECT count(*) FROM t")).scalar()
        s.execute(text("INSERT INTO t VALUES (2)"))
        order.append(f"second saw {n}")
    thread.join()
    assert order == ["first", "second saw 1"]
    with db.read() as s:
        assert s.execute(text("SELECT count(*) FROM t")).scalar() == 2
    db.dispose()
