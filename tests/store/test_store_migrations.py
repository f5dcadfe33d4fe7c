"""Migrations: models and migrated schema do not drift, downgrade/upgrade round-trips, the startup check."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text
from typer.testing import CliRunner

from cli.main import app
from core.settings import get_settings
from core.store import migrate
from core.store.db import make_engine
from core.store.models import Base


def _drift(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": False}
            )
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


HEAD = "0005"


def test_single_head_is_the_newest_revision() -> None:
    assert migrate.head_revision() == HEAD
    assert (migrate.MIGRATIONS_DIR / "versions" / "0001_initial.py").is_file()
    assert (migrate.MIGRATIONS_DIR / "versions" / "0002_webhook_deliveries.py").is_file()
    assert (migrate.MIGRATIONS_DIR / "versions" / "0003_job_metric_rows.py").is_file()
    assert (migrate.MIGRATIONS_DIR / "versions" / "0004_job_queue_reason.py").is_file()
    assert (migrate.MIGRATIONS_DIR / "versions" / "0005_eval_generations.py").is_file()


def test_models_and_migrated_schema_do_not_drift(empty_url: str) -> None:
    assert migrate.upgrade(empty_url) == migrate.head_revision()
    assert _drift(empty_url) == []
    assert set(Base.metadata.tables) <= _tables(empty_url)


def test_downgrade_then_upgrade(empty_url: str) -> None:
    migrate.upgrade(empty_url)
    assert migrate.downgrade(empty_url, "base") is None
    assert _tables(empty_url) - {"alembic_version"} == set()
    assert migrate.current_revision(empty_url) is None
    assert migrate.upgrade(empty_url) == HEAD
    assert _drift(empty_url) == []


@contextmanager
def migrated_to(url: str, revision: str) -> Iterator[Engine]:
    """The database at `revision` holding one project, `p`; the engine is disposed afterwards."""
    migrate.upgrade(url, revision)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO projects (name, created_at) VALUES ('p', CURRENT_TIMESTAMP)"))
        yield engine
    finally:
        engine.dispose()


def test_upgrade_from_0001_keeps_rows_and_downgrade_drops_only_the_new_table(empty_url: str) -> None:
    with migrated_to(empty_url, "0001") as engine:
        assert "webhook_deliveries" not in inspect(engine).get_table_names()
        assert migrate.upgrade(empty_url) == HEAD
        assert _drift(empty_url) == []
        assert migrate.downgrade(empty_url, "0001") == "0001"
        with engine.connect() as conn:
            assert conn.execute(text("SELECT name FROM projects")).scalars().all() == ["p"]
        assert "webhook_deliveries" not in _tables(empty_url)


def test_upgrade_to_0003_counts_each_jobs_stored_metric_rows(empty_url: str) -> None:
    with migrated_to(empty_url, "0002") as engine:
        with engine.begin() as conn:
            for job in ("j1", "j2"):
                conn.execute(
                    text(
                        "INSERT INTO jobs (id, project, name, status, spec, created_at, updated_at) "
                        "VALUES (:id, 'p', 'n', 'running', '{}', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                    ),
                    {"id": job},
                )
            for step in (1, 2, 5):
                conn.execute(
                    text(
                        "INSERT INTO metric_points (job_id, step, wall_time, metrics) VALUES ('j1', :s, 0, '{}')"
                    ),
                    {"s": step},
                )
        assert migrate.upgrade(empty_url) == HEAD
        with engine.connect() as conn:
            counts = dict(conn.execute(text("SELECT id, metric_rows FROM jobs ORDER BY id")).all())
        assert counts == {"j1": 3, "j2": 0}
        assert migrate.downgrade(empty_url, "0002") == "0002"
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM metric_points")).scalar_one() == 3
            assert conn.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 2
        assert "metric_rows" not in {c["name"] for c in inspect(engine).get_columns("jobs")}


def test_upgrade_to_0005_adds_eval_generations_and_downgrade_drops_only_it(empty_url: str) -> None:
    with migrated_to(empty_url, "0004") as engine:
        assert "eval_generations" not in inspect(engine).get_table_names()
        assert migrate.upgrade(empty_url) == HEAD
        assert "eval_generations" in _tables(empty_url)
        assert migrate.downgrade(empty_url, "0004") == "0004"
        assert "eval_generations" not in _tables(empty_url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT name FROM projects")).scalars().all() == ["p"]


def test_ensure_schema_current_refuses_an_empty_database(empty_url: str) -> None:
    with pytest.raises(migrate.SchemaOutOfDateError) as info:
        migrate.ensure_schema_current(empty_url)
    message = str(info.value)
    assert f"code expects {HEAD}" in message
    assert "run `minordpo db upgrade`" in message
    assert info.value.current is None and info.value.head == HEAD


def test_ensure_schema_current_auto_migrates_when_asked(empty_url: str) -> None:
    assert migrate.ensure_schema_current(empty_url, auto_migrate=True) == HEAD
    assert migrate.current_revision(empty_url) == HEAD
    assert migrate.ensure_schema_current(empty_url) == HEAD  # now current: no error, no change


def test_ensure_schema_current_refuses_an_unknown_newer_revision(empty_url: str) -> None:
    migrate.upgrade(empty_url)
    engine = make_engine(empty_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff9999'"))
    engine.dispose()
    with pytest.raises(migrate.SchemaOutOfDateError, match="does not know"):
        migrate.ensure_schema_current(empty_url, auto_migrate=True)


def test_cli_db_upgrade_and_current(empty_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINORDPO_DATABASE_URL", empty_url)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        before = runner.invoke(app, ["db", "current"])
        assert before.exit_code == 1 and "out of date" in before.output
        result = runner.invoke(app, ["db", "upgrade"])
        assert result.exit_code == 0, result.output
        assert HEAD in result.output
        again = runner.invoke(app, ["db", "upgrade"])
        assert again.exit_code == 0 and f"already at {HEAD}" in again.output
        current = runner.invoke(app, ["db", "current"])
        assert current.exit_code == 0 and "up to date" in current.output
    finally:
        get_settings.cache_clear()
    assert migrate.current_revision(empty_url) == HEAD


def test_open_database_checks_the_schema(empty_url: str) -> None:
    with pytest.raises(migrate.SchemaOutOfDateError, match="minordpo db upgrade"):
        migrate.open_database(empty_url)
    database = migrate.open_database(empty_url, auto_migrate=True)
    try:
        with database.read() as s:
            assert s.execute(text("SELECT count(*) FROM jobs")).scalar() == 0
    finally:
        database.dispose()
