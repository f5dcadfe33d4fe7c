"""Programmatic Alembic: upgrade/downgrade, current vs head, and the startup schema check."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from core.store.db import Database, make_engine, normalize_url

#: The repository's top-level `migrations/` folder (Alembic's script_location).
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
UPGRADE_COMMAND = "minordpo db upgrade"


class SchemaOutOfDateError(RuntimeError):
    """The database schema is not the one this code expects (and auto-migration is off)."""

    def __init__(self, current: str | None, head: str, message: str) -> None:
        super().__init__(message)
        self.current = current
        self.head = head


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database stands: its revision, the code's head revision, and whether they match."""

    current: str | None
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def alembic_config(url: str | URL | None = None) -> Config:
    """An Alembic Config pointing at `migrations/`, with `url` as sqlalchemy.url when given."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise RuntimeError(f"Alembic migrations not found at {MIGRATIONS_DIR}")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        rendered = normalize_url(url).render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest revision in `migrations/versions` (a single head is enforced)."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migrations must have exactly one head, found {heads}")
    return heads[0]


def _with_engine(url: str | URL | Engine) -> tuple[Engine, bool]:
    if isinstance(url, Engine):
        return url, False
    return make_engine(url), True


def current_revision(url: str | URL | Engine) -> str | None:
    """The revision the database is at, or None for an empty (never migrated) database."""
    engine, owned = _with_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        if owned:
            engine.dispose()


def schema_status(url: str | URL | Engine) -> SchemaStatus:
    """`current_revision` and `head_revision` together."""
    return SchemaStatus(current=current_revision(url), head=head_revision())


def _run(url: str | URL | Engine, fn: str, revision: str) -> str | None:
    engine, owned = _with_engine(url)
    try:
        cfg = alembic_config(engine.url)
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            getattr(command, fn)(cfg, revision)
        return current_revision(engine)
    finally:
        if owned:
            engine.dispose()


def upgrade(url: str | URL | Engine, revision: str = "head") -> str | None:
    """Upgrade the database to `revision` (default: head); returns the revision reached."""
    return _run(url, "upgrade", revision)


def downgrade(url: str | URL | Engine, revision: str) -> str | None:
    """Downgrade the database to `revision` (``base`` drops everything); returns the revision reached."""
    return _run(url, "downgrade", revision)


def _known(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def ensure_schema_current(url: str | URL | Engine, auto_migrate: bool = False) -> str:
    """Return the head revision if the database is at it; upgrade first if `auto_migrate`.

    Raises SchemaOutOfDateError ("database schema is at X, code expects Y: run `minordpo db upgrade`")
    when the database is behind and `auto_migrate` is off, or when it is at a revision this code does
    not know (a newer release migrated it: upgrade the code, not the database).
    """
    status = schema_status(url)
    if status.up_to_date:
        return status.head
    if status.current is not None and not _known(status.current):
        raise SchemaOutOfDateError(
            status.current,
            status.head,
            f"database schema is at {status.current}, which this code does not know (it expects "
            f"{status.head}); the database was migrated by a newer release: run that release",
        )
    if auto_migrate:
        reached = upgrade(url)
        if reached != status.head:
            raise SchemaOutOfDateError(reached, status.head, f"auto-migration stopped at {reached}")
        return status.head
    shown = status.current or "empty (no tables)"
    raise SchemaOutOfDateError(
        status.current,
        status.head,
        f"database schema is at {shown}, code expects {status.head}: run `{UPGRADE_COMMAND}` "
        "(or set MINORDPO_AUTO_MIGRATE=true)",
    )


def open_database(url: str | URL, *, auto_migrate: bool = False) -> Database:
    """A Database for `url` after `ensure_schema_current` (what the server and dispatcher start with).

    Raises SchemaOutOfDateError with the fix-it message when the schema is behind and
    `auto_migrate` is off.
    """
    database = Database(url)
    try:
        ensure_schema_current(database.engine, auto_migrate=auto_migrate)
    except BaseException:
        database.dispose()
        raise
    return database
