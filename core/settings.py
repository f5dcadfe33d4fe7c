"""Service settings: one pydantic-settings class read from `MINORDPO_*` environment variables."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service, in one place (names are the public contract of DESIGN.md)."""

    model_config = SettingsConfigDict(env_prefix="MINORDPO_", extra="ignore")

    database_url: str = "sqlite:///var/minordpo.db"
    artifacts_dir: Path = Path("var/artifacts")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="API server processes of `minordpo serve` (uvicorn workers on one socket); the "
        "embedded dispatcher stays one, in the parent process",
    )
    api_tokens: str | None = None
    api_tokens_file: Path | None = None
    allowed_paths: str | None = None
    max_concurrent_jobs: int = Field(2, ge=1)
    allow_remote_code: bool = False
    auto_migrate: bool = False
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)
    max_request_bytes: int = Field(1024 * 1024, ge=1)
    log_level: str = "INFO"
    ray_address: str | None = Field(
        None, validation_alias=AliasChoices("RAY_ADDRESS", "MINORDPO_RAY_ADDRESS")
    )
    embedded_dispatcher: bool = Field(True, description="Run the dispatcher inside `minordpo serve`")
    dispatch_interval_s: float = Field(1.0, gt=0, description="Seconds between dispatcher passes")
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray head (default: all)")
    ray_warm_workers: int = Field(
        2,
        ge=0,
        description="Train worker processes the local Ray head keeps started ahead of jobs, with the training "
        "stack imported, besides the other processes one job needs (0: no warm processes)",
    )
    ray_state_file: Path = Field(
        Path("var/ray-head.json"), description="Where the local Ray head is recorded"
    )
    stop_ray_on_exit: bool = Field(True, description="Stop the local Ray head when the server exits cleanly")
    public_docs: bool = Field(False, description="Serve /docs and /openapi.json without a token")
    log_json: bool = Field(True, description="One JSON object per log line (else plain text)")
    otel: bool = Field(
        False,
        description="FastAPI's OpenTelemetry spans, metrics and logs (needs an OpenTelemetry SDK set up in "
        "the process, e.g. by opentelemetry-instrument); off, nothing checks for one on each request",
    )
    webhook_secret: SecretStr | None = Field(
        None, description="Master secret for webhook signatures (default: generated in the artifacts dir)"
    )
    webhook_allowed_hosts: str = Field(
        "*", description="Comma-separated host patterns (fnmatch) that webhook URLs may point at"
    )
    webhook_allow_private: bool = Field(
        False,
        description="Let webhooks reach loopback/private/link-local addresses (off: no SSRF into the network)",
    )
    webhook_max_attempts: int = Field(8, ge=1, le=100, description="Attempts per webhook delivery")
    webhook_backoff_s: float = Field(2.0, gt=0, description="First retry delay; doubles per attempt")
    tokenizer_cache_size: int = Field(4, ge=0, description="Tokenizers kept in memory for /v1/jobs:validate")

    def token_text(self) -> str:
        """The raw `PROJECT:TOKEN` entries of API_TOKENS and API_TOKENS_FILE, newline-separated (parse with core.store)."""
        parts = [self.api_tokens or ""]
        if self.api_tokens_file:
            parts.append(self.api_tokens_file.read_text(encoding="utf-8"))
        return "\n".join(p for p in parts if p.strip())

    def allowed_roots(self) -> list[Path]:
        """Roots that local model/dataset paths must resolve into (default: the current directory).

        The artifacts dir is not a root: uploads and trained models are reached by id (`ds_...`, a job
        id), so one project cannot name another's files; see `service_owned_paths`.
        """
        if self.allowed_paths:
            roots = [Path(p) for p in self.allowed_paths.split(os.pathsep) if p.strip()]
        else:
            roots = [Path.cwd()]
        return [r.expanduser().resolve() for r in roots]

    def service_owned_paths(self) -> list[Path]:
        """Files and folders of the service itself, never readable through a spec path, whatever the roots.

        The artifacts dir (uploads, job outputs, the webhook secret, the driver settings), the SQLite
        database with its journal files, the token file and the local Ray head's state and log.
        """
        from core.store.db import sqlite_file

        owned = [self.artifacts_dir, self.ray_state_file, self.ray_state_file.with_suffix(".log")]
        database = sqlite_file(self.database_url)
        if database is not None:
            owned += [database.with_name(database.name + s) for s in ("", "-wal", "-shm", "-journal")]
        if self.api_tokens_file is not None:
            owned.append(self.api_tokens_file)
        return [Path(os.path.realpath(p.expanduser())) for p in owned]

    @field_validator("webhook_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("MINORDPO_WEBHOOK_SECRET must be at least 32 characters")
        return value

    def webhook_master_secret(self) -> bytes:
        """The master webhook secret: WEBHOOK_SECRET, else one generated once under the artifacts dir."""
        from core.webhooks import master_secret

        configured = self.webhook_secret.get_secret_value() if self.webhook_secret else None
        return master_secret(configured, self.artifacts_dir)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; tests call `get_settings.cache_clear()`)."""
    return Settings()
