"""Service settings: one pydantic-settings class read from `MINORDPO_*` environment variables."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.data.limits import DataLimits
from core.scheduling import ProjectQuota, parse_project_quotas


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
    project_quotas: Annotated[dict[str, ProjectQuota], NoDecode] = Field(
        default_factory=dict,
        description='Per-project limits on running jobs, workers and GPUs, as JSON: {"default": {"max_jobs": 2}, '
        '"team-a": {"max_jobs": 4, "max_gpus": 8}}; "default" covers projects not named (none: no limits)',
    )
    allow_remote_code: bool = False
    auto_migrate: bool = False
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)
    max_request_bytes: int = Field(1024 * 1024, ge=1)
    max_dataset_bytes: int = Field(
        2 * 1024**3, ge=1, description="Bytes of one dataset file once decompressed (413 beyond it)"
    )
    max_line_bytes: int = Field(
        2 * 1024**2, ge=1, description="Bytes of one JSONL line of a dataset (422 naming the line beyond)"
    )
    max_json_bytes: int = Field(
        256 * 1024**2, ge=1, description="Bytes of a whole-array .json dataset, parsed in memory (413 beyond)"
    )
    max_json_depth: int = Field(
        100, ge=2, le=1000, description="Nesting of arrays/objects in one dataset row (deeper: a bad row)"
    )
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
        default_factory=lambda data: data["artifacts_dir"] / "ray-head.json",
        description="Where the local Ray head is recorded (default: `<artifacts_dir>/ray-head.json`, so "
        "servers with their own artifacts dirs never share a head)",
    )
    stop_ray_on_exit: bool = Field(True, description="Stop the local Ray head when the server exits cleanly")
    public_docs: bool = Field(False, description="Serve /docs and /openapi.json without a token")
    log_format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="Log lines: json (one object a line), text (readable, Rich), or auto: text on a terminal, "
        "JSON otherwise",
    )
    log_json: bool | None = Field(
        None, description="Older switch: true/false forces JSON/text when LOG_FORMAT is auto"
    )
    otel: bool = Field(
        False,
        description="FastAPI's OpenTelemetry spans, metrics and logs (needs an OpenTelemetry SDK set up in "
        "the process, e.g. by opentelemetry-instrument); off, nothing checks for one on each request",
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        max_length=2048,
        description="MLflow tracking server (http(s)://host:port) every job reports its run to; unset: none",
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
    hub_timeout_s: float = Field(
        5.0, gt=0, le=600, description="Longest /v1/jobs:validate waits for the hub (a hub id's tokenizer)"
    )
    hub_load_threads: int = Field(
        2, ge=1, le=64, description="Hub look-ups of /v1/jobs:validate at once; more get 503 + Retry-After"
    )
    hub_offline: bool = Field(
        False,
        validation_alias=AliasChoices("MINORDPO_HUB_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"),
        description="No model hub: /v1/jobs:validate answers a hub id with 422 at once (also HF_HUB_OFFLINE)",
    )
    hub_datasets_root: Path | None = Field(
        None,
        description="A local mirror of hub datasets: `hf:OWNER/NAME` loads the dataset repository folder "
        "`<root>/OWNER/NAME` with the same datasets.load_dataset (for air-gapped servers and tests)",
    )

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
        database with its journal files, the token file and the local Ray head's state, log and auth token.
        """
        from core.store.db import sqlite_file

        head = self.ray_state_file
        owned = [self.artifacts_dir, head, head.with_suffix(".log"), head.with_name("ray-auth-token")]
        database = sqlite_file(self.database_url)
        if database is not None:
            owned += [database.with_name(database.name + s) for s in ("", "-wal", "-shm", "-journal")]
        if self.api_tokens_file is not None:
            owned.append(self.api_tokens_file)
        return [Path(os.path.realpath(p.expanduser())) for p in owned]

    def data_limits(self) -> DataLimits:
        """The dataset input limits (MAX_DATASET_BYTES, MAX_LINE_BYTES, MAX_JSON_BYTES, MAX_JSON_DEPTH)."""
        return DataLimits(
            max_dataset_bytes=self.max_dataset_bytes,
            max_line_bytes=self.max_line_bytes,
            max_json_bytes=self.max_json_bytes,
            max_json_depth=self.max_json_depth,
        )

    @field_validator("hub_offline", mode="before")
    @classmethod
    def _hub_flag(cls, value: object) -> object:
        """HF_HUB_OFFLINE's own reading: 1/ON/YES/TRUE (any case) is on, anything else (even empty) off."""
        if isinstance(value, str):
            return value.strip().upper() in {"1", "ON", "YES", "TRUE"}
        return value

    @field_validator("project_quotas", mode="before")
    @classmethod
    def _quotas(cls, value: Any) -> Any:
        """JSON text or a mapping -> quota per project; the error names the bad entry or key."""
        return parse_project_quotas(value)

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
