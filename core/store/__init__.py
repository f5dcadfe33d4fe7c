"""Persistence: SQLAlchemy models, queries and migrations helpers (no web, no Ray).

Transactions belong to the caller: store functions take a Session, flush, and never commit. Wrap a
unit of work in ``Database.write()`` (``BEGIN IMMEDIATE`` on SQLite) or ``Database.read()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.store.checkpoints import (
    add_checkpoint,
    delete_checkpoint,
    final_model_path,
    latest_checkpoint,
    list_checkpoints,
)
from core.store.datasets import get_dataset, list_datasets, register_dataset
from core.store.db import Database, make_engine, normalize_url, sqlite_file
from core.store.dispatch import (
    active_jobs,
    claim_queued,
    oldest_queued,
    queued_span,
    record_attempt,
    set_queue_reasons,
    set_ray_submission,
    update_progress,
)
from core.store.errors import IdempotencyConflictError, InvalidCursorError, NotFoundError, StoreError
from core.store.events import append_event, last_event_seq, list_events
from core.store.generations import add_generations, generation_steps, get_generations
from core.store.jobs import (
    JOB_VIEW_COLUMNS,
    TRANSITIONS,
    JobError,
    JobPage,
    JobRow,
    cancel_job,
    count_jobs,
    create_job,
    get_job,
    job_visible,
    list_jobs,
    purge_idempotency_keys,
    queue_position,
    queue_positions,
    read_job_row,
    read_job_row_async,
    require_job,
    transition,
)
from core.store.metrics import MetricRow, MetricSeries, append_metrics, metric_series
from core.store.models import (
    TERMINAL_STATUSES,
    ApiToken,
    Base,
    Checkpoint,
    Dataset,
    EvalGeneration,
    IdempotencyKey,
    Job,
    JobEvent,
    JobStatus,
    MetricPoint,
    Project,
    job_error_payload,
)
from core.store.projects import (
    ADMIN_PROJECT,
    ensure_project,
    hash_token,
    list_projects,
    parse_token_entries,
    project_for_token,
    sync_tokens,
)

if TYPE_CHECKING:
    from core.store.migrate import (
        SchemaOutOfDateError,
        current_revision,
        ensure_schema_current,
        head_revision,
        open_database,
        upgrade,
    )

_FROM_MIGRATE = frozenset(
    {
        "SchemaOutOfDateError",
        "current_revision",
        "ensure_schema_current",
        "head_revision",
        "open_database",
        "upgrade",
    }
)
"""Exported here, imported on first use: core.store.migrate brings Alembic in, which most callers never need."""


def __getattr__(name: str) -> Any:
    """The migration helpers, from core.store.migrate on first use (PEP 562)."""
    if name in _FROM_MIGRATE:
        from core.store import migrate

        return getattr(migrate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "active_jobs",
    "oldest_queued",
    "record_attempt",
    "ADMIN_PROJECT",
    "TERMINAL_STATUSES",
    "JOB_VIEW_COLUMNS",
    "TRANSITIONS",
    "ApiToken",
    "Base",
    "Checkpoint",
    "Database",
    "Dataset",
    "IdempotencyConflictError",
    "IdempotencyKey",
    "InvalidCursorError",
    "Job",
    "JobError",
    "JobEvent",
    "JobPage",
    "JobRow",
    "JobStatus",
    "MetricPoint",
    "MetricRow",
    "MetricSeries",
    "NotFoundError",
    "Project",
    "SchemaOutOfDateError",
    "StoreError",
    "add_checkpoint",
    "add_generations",
    "EvalGeneration",
    "generation_steps",
    "get_generations",
    "append_event",
    "append_metrics",
    "cancel_job",
    "claim_queued",
    "count_jobs",
    "create_job",
    "current_revision",
    "delete_checkpoint",
    "final_model_path",
    "ensure_project",
    "ensure_schema_current",
    "get_dataset",
    "get_job",
    "job_visible",
    "hash_token",
    "head_revision",
    "job_error_payload",
    "last_event_seq",
    "latest_checkpoint",
    "list_checkpoints",
    "list_datasets",
    "list_events",
    "list_jobs",
    "list_projects",
    "make_engine",
    "metric_series",
    "normalize_url",
    "open_database",
    "parse_token_entries",
    "project_for_token",
    "purge_idempotency_keys",
    "queue_position",
    "queue_positions",
    "queued_span",
    "read_job_row",
    "read_job_row_async",
    "register_dataset",
    "require_job",
    "set_queue_reasons",
    "set_ray_submission",
    "sqlite_file",
    "sync_tokens",
    "transition",
    "update_progress",
    "upgrade",
]
