"""SQLAlchemy 2.0 declarative models: projects, API tokens, jobs, events, metrics, checkpoints, eval generations, datasets."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: JSON everywhere, stored as JSONB on PostgreSQL (key lookups and `||` merges for metric rows).
JSONType = JSON().with_variant(JSONB(), "postgresql")


class JobStatus(enum.StrEnum):
    """The public job states of DESIGN.md."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always written as UTC and read back timezone-aware (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base; the metadata's naming convention gives every constraint a stable name."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Project(Base):
    """A tenant: jobs, datasets and tokens belong to one project (`*` is the admin pseudo-project)."""

    __tablename__ = "projects"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiToken(Base):
    """A bearer token, stored only as its SHA-256 hex digest."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project: Mapped[str] = mapped_column(String(64), ForeignKey("projects.name", ondelete="CASCADE"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str | None] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(String(16), server_default=text("'settings'"), default="settings")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Job(Base):
    """A training job. `seq` orders jobs (queue order, newest-first pages); `id` is the public id."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name="status_valid"
        ),
        Index("ix_jobs_project_seq", "project", "seq"),
        Index("ix_jobs_status_seq", "status", "seq"),
    )

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    project: Mapped[str] = mapped_column(String(64), ForeignKey("projects.name"))
    name: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, server_default=false(), default=False)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    group_id: Mapped[str | None] = mapped_column(String(40), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    step: Mapped[int] = mapped_column(Integer, server_default=text("0"), default=0)
    # rows in metric_points, kept by append_metrics (the downsampled series needs the count). Anything
    # that ever deletes a job's metric rows must lower it too: metric_series trusts it to prove the
    # steps have no gaps (an undercount only turns that shortcut off; an overcount would lose points).
    metric_rows: Mapped[int] = mapped_column(Integer, server_default=text("0"), default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    latest_metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, server_default=text("0"), default=0)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    ray_submission_id: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_event_seq: Mapped[int] = mapped_column(Integer, server_default=text("0"), default=0)
    queue_reason: Mapped[str | None] = mapped_column(Text)  # why a queued job waits (the dispatcher's word)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def error(self) -> dict[str, str] | None:
        """``{code, message}`` of a failed job, else None (the API's `error` field)."""
        return job_error_payload(self.error_code, self.error_message)


def job_error_payload(code: str | None, message: str | None) -> dict[str, str] | None:
    """The API's `error` of a job from its two columns: ``{code, message}``, or None without a code."""
    if code is None:
        return None
    return {"code": code, "message": message or ""}


class IdempotencyKey(Base):
    """One `Idempotency-Key` per project: the job it created and a hash of the request body."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (PrimaryKeyConstraint("project", "key"),)

    project: Mapped[str] = mapped_column(String(64), ForeignKey("projects.name", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class JobEvent(Base):
    """An event of a job; `seq` increases per job in commit order (the SSE event id)."""

    __tablename__ = "job_events"
    __table_args__ = (
        PrimaryKeyConstraint("job_id", "seq"),
        UniqueConstraint("job_id", "dedup_key"),
    )

    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    dedup_key: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class MetricPoint(Base):
    """All metrics a job reported at one step, as one row (see core/store/metrics.py for why)."""

    __tablename__ = "metric_points"
    __table_args__ = (PrimaryKeyConstraint("job_id", "step"),)

    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer, autoincrement=False)
    wall_time: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType)


class Checkpoint(Base):
    """A saved checkpoint of a job; one per (job, step)."""

    __tablename__ = "checkpoints"
    __table_args__ = (PrimaryKeyConstraint("job_id", "step"),)

    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer, autoincrement=False)
    path: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class EvalGeneration(Base):
    """Greedy completions of a job's fixed eval prompts at one eval step (training.eval_generations).

    ``samples``: a list of ``{index, prompt, chosen, completion}``, texts cut to a bounded length.
    """

    __tablename__ = "eval_generations"
    __table_args__ = (PrimaryKeyConstraint("job_id", "step"),)

    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer, autoincrement=False)
    samples: Mapped[list[dict[str, Any]]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Dataset(Base):
    """An uploaded preference dataset, content-addressed (`ds_<sha256 prefix>`) within its project."""

    __tablename__ = "datasets"
    __table_args__ = (
        PrimaryKeyConstraint("project", "id"),
        ForeignKeyConstraint(["project"], ["projects.name"], ondelete="CASCADE"),
        Index("ix_datasets_id", "id"),
    )

    project: Mapped[str] = mapped_column(String(64))
    id: Mapped[str] = mapped_column(String(40))
    filename: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(32))
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookDelivery(Base):
    """One signed POST owed to one webhook URL for one job event (an outbox row, retried with backoff)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="status_valid"),
        UniqueConstraint("job_id", "event_seq", "url"),
        Index("ix_webhook_deliveries_status_due", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    event_seq: Mapped[int] = mapped_column(Integer)
    event_type: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"), default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    claim_token: Mapped[str | None] = mapped_column(String(32))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
