"""Projects and API tokens: tokens are kept only as SHA-256 digests, synced from settings."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from core.store.models import ApiToken, Project, utcnow

#: The admin pseudo-project of `MINORDPO_API_TOKENS` (`*:TOKEN`): sees every project.
ADMIN_PROJECT = "*"
PROJECT_NAME_RE = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,63})$")


def dialect_insert(session: Session, table: type) -> Any:
    """`INSERT` with `on_conflict_do_nothing/update` for the session's dialect (PostgreSQL or SQLite)."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return pg_insert(table)
    if name == "sqlite":
        return sqlite_insert(table)
    raise NotImplementedError(f"database dialect {name!r} is not supported (use SQLite or PostgreSQL)")


def validate_project(name: str) -> str:
    """Return `name` if it is a valid project name (letters, digits, `._-`, up to 64; or `*`), else ValueError."""
    if not isinstance(name, str) or not PROJECT_NAME_RE.match(name):
        raise ValueError(f"invalid project name {name!r}: use letters, digits, '.', '_' or '-' (max 64)")
    return name


def ensure_project(session: Session, name: str) -> None:
    """Create the project row if it does not exist (safe under concurrent callers)."""
    validate_project(name)
    session.execute(
        dialect_insert(session, Project)
        .values(name=name, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["name"])
    )


def list_projects(session: Session) -> list[str]:
    """Every project name, sorted."""
    return list(session.scalars(select(Project.name).order_by(Project.name)))


def hash_token(token: str) -> str:
    """SHA-256 hex digest of a bearer token (tokens are high-entropy secrets: no salt or KDF needed)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_token_entries(text: str) -> list[tuple[str, str]]:
    """Parse ``PROJECT:TOKEN`` entries separated by commas or newlines (blank lines and `#` comments skipped)."""
    entries = []
    for raw in re.split(r"[,\n]", text):
        item = raw.strip()
        if not item or item.startswith("#"):
            continue
        project, sep, token = item.partition(":")
        if not sep or not project.strip() or not token.strip():
            raise ValueError("API token entries must look like PROJECT:TOKEN")
        entries.append((validate_project(project.strip()), token.strip()))
    return entries


def sync_tokens(session: Session, entries: Iterable[tuple[str, str]], *, source: str = "settings") -> int:
    """Make the tokens of `source` exactly `entries` (add, move to another project, revoke the rest).

    Returns the number of tokens of `source` afterwards. Raises ValueError for an empty token, a bad
    project name, or one token given to two projects.
    """
    wanted: dict[str, str] = {}
    for project, token in entries:
        validate_project(project)
        if not token:
            raise ValueError(f"empty API token for project {project!r}")
        digest = hash_token(token)
        if wanted.get(digest, project) != project:
            raise ValueError("the same API token is configured for two projects")
        wanted[digest] = project
    for project in sorted(set(wanted.values())):
        ensure_project(session, project)
    # An upsert, in one order everywhere: replicas starting together sync the same tokens at once.
    for digest, project in sorted(wanted.items()):
        insert = dialect_insert(session, ApiToken).values(
            project=project, token_hash=digest, source=source, created_at=utcnow()
        )
        session.execute(
            insert.on_conflict_do_update(
                index_elements=["token_hash"], set_={"project": project, "source": source}
            )
        )
    existing = session.execute(select(ApiToken.token_hash, ApiToken.source)).all()
    stale = [h for h, src in existing if src == source and h not in wanted]
    if stale:
        session.execute(delete(ApiToken).where(ApiToken.token_hash.in_(stale)))
    session.flush()
    return len(wanted)


def project_for_token(session: Session, token: str) -> str | None:
    """The project a bearer token belongs to (``*`` for the admin), or None for an unknown token."""
    if not token:
        return None
    digest = hash_token(token)
    row = session.execute(
        select(ApiToken.token_hash, ApiToken.project).where(ApiToken.token_hash == digest)
    ).first()
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        return None
    return row.project
