"""Bearer-token authentication: tokens from settings, stored hashed in the database, one project each."""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass

from fastapi.concurrency import run_in_threadpool

from api.logging import register_secret
from core.settings import Settings
from core.store import (
    ADMIN_PROJECT,
    Database,
    hash_token,
    parse_token_entries,
    project_for_token,
    sync_tokens,
)

log = logging.getLogger("api.auth")
#: Where jobs and datasets go when the caller is the admin or the server runs open.
DEFAULT_PROJECT = "default"
_CACHE_TTL_S = 30.0


@dataclass(frozen=True)
class Principal:
    """Who is calling: a project, or the admin (`*`), which sees every project."""

    project: str

    @property
    def is_admin(self) -> bool:
        return self.project == ADMIN_PROJECT

    @property
    def scope(self) -> str | None:
        """The project filter for store queries (None = every project)."""
        return None if self.is_admin else self.project

    @property
    def owner(self) -> str:
        """The project that new jobs and datasets of this caller belong to."""
        return DEFAULT_PROJECT if self.is_admin else self.project


class StartupError(RuntimeError):
    """The server must not start with this configuration (the message says why and what to do)."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_token_entries(settings: Settings) -> list[tuple[str, str]]:
    """Parse API_TOKENS / API_TOKENS_FILE; a StartupError that never shows a token when they are malformed."""
    try:
        text = settings.token_text()
    except OSError as exc:
        raise StartupError(
            f"cannot read MINORDPO_API_TOKENS_FILE {settings.api_tokens_file}: {exc.strerror}"
        ) from exc
    try:
        entries = parse_token_entries(text)
    except ValueError as exc:
        raise StartupError(f"bad API token configuration: {exc}") from exc
    for _, token in entries:
        register_secret(token)
    return entries


def check_open_bind(settings: Settings, entries: list[tuple[str, str]]) -> None:
    """Without tokens, serve only on loopback: StartupError for any other bind address."""
    if not entries and not is_loopback(settings.host):
        raise StartupError(
            f"refusing to serve on {settings.host} without API tokens: set MINORDPO_API_TOKENS "
            "(PROJECT:TOKEN,...) or MINORDPO_API_TOKENS_FILE, or bind to 127.0.0.1"
        )


class Authenticator:
    """Checks `Authorization: Bearer` headers against the token table (results cached for a few seconds)."""

    def __init__(self, db: Database, enabled: bool) -> None:
        self.db = db
        self.enabled = enabled
        self._cache: dict[str, tuple[str, float]] = {}

    @classmethod
    def from_settings(cls, settings: Settings, db: Database) -> Authenticator:
        """Sync the configured tokens into the database (hashed) and refuse an open server off loopback."""
        entries = load_token_entries(settings)
        check_open_bind(settings, entries)
        if not entries:
            log.warning(
                "no API tokens configured: the API is open to every local user on %s "
                "(set MINORDPO_API_TOKENS to require tokens)",
                settings.host,
            )
            return cls(db, enabled=False)
        try:
            with db.write() as session:
                count = sync_tokens(session, entries)
        except ValueError as exc:
            raise StartupError(f"bad API token configuration: {exc}") from exc
        log.info("API tokens loaded: %d token(s) for %d project(s)", count, len({p for p, _ in entries}))
        return cls(db, enabled=True)

    def open_principal(self) -> Principal:
        """The caller when no tokens are configured (loopback only): the admin."""
        return Principal(ADMIN_PROJECT)

    def _lookup(self, token: str) -> str | None:
        with self.db.read() as session:
            return project_for_token(session, token)

    async def authenticate(self, header: str | None) -> Principal | None:
        """The principal for an Authorization header, or None when it is missing or not a known token."""
        if not header:
            return None
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        digest = hash_token(token)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached is not None and now - cached[1] < _CACHE_TTL_S:
            return Principal(cached[0])
        project = await run_in_threadpool(self._lookup, token)
        if project is None:
            self._cache.pop(digest, None)
            return None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (project, now)
        return Principal(project)
