"""Dispatcher-side job queries: atomic claim of queued jobs, progress heartbeats, Ray submission ids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.orm import Session

from core.store.events import append_event
from core.store.jobs import count_jobs
from core.store.models import TERMINAL_STATUSES, Job, JobStatus, utcnow

# Serialises claimers that enforce `max_running` on PostgreSQL (SQLite writers are serialised anyway).
_PG_CLAIM_LOCK = 0x6D696E6F72636C6D


def claim_queued(
    session: Session,
    limit: int,
    worker_id: str,
    *,
    max_running: int | None = None,
    job_ids: Sequence[str] | None = None,
) -> list[Job]:
    """Atomically move up to `limit` of the oldest queued jobs to running for `worker_id`.

    ``SELECT ... FOR UPDATE SKIP LOCKED`` then a conditional ``UPDATE ... WHERE status = 'queued'
    RETURNING``: on PostgreSQL concurrent claimers skip each other's rows; on SQLite the write
    transaction (``Database.write``: BEGIN IMMEDIATE) excludes other claimers, and the status guard
    holds even without it. No job is claimed twice. Sets started_at, claimed_by, attempt += 1 and appends the status events. With
    `max_running`, claims only up to that many running jobs in total (claimers serialised by an
    advisory lock on PostgreSQL). With `job_ids`, claims only among those (the scheduler's choice).
    Returns the claimed jobs, oldest first.
    """
    if max_running is not None:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_CLAIM_LOCK})
        limit = min(limit, max_running - count_jobs(session, status=JobStatus.RUNNING.value))
    if limit <= 0:
        return []
    now = utcnow()
    # Two statements, not `UPDATE ... WHERE seq IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)`:
    # PostgreSQL may rescan that subquery after updating rows, then find further queued jobs and
    # claim more than `limit`.
    candidates = select(Job.seq).where(Job.status == JobStatus.QUEUED.value)
    if job_ids is not None:
        candidates = candidates.where(Job.id.in_(list(job_ids)))
    picked = list(
        session.scalars(candidates.order_by(Job.seq).limit(limit).with_for_update(skip_locked=True))
    )
    if not picked:
        return []
    claimed = session.scalars(
        update(Job)
        .where(Job.seq.in_(picked), Job.status == JobStatus.QUEUED.value)
        .values(
            status=JobStatus.RUNNING.value,
            started_at=now,
            updated_at=now,
            heartbeat_at=now,
            claimed_by=worker_id,
            attempt=Job.attempt + 1,
            queue_reason=None,
        )
        .returning(Job),
        execution_options={"synchronize_session": False, "populate_existing": True},
    ).all()
    jobs = sorted(claimed, key=lambda j: j.seq)
    for job in jobs:
        append_event(
            session,
            job.id,
            "status",
            f"queued -> running (claimed by {worker_id})",
            {"from": "queued", "to": "running", "worker": worker_id},
            dedup_key="status:running",
        )
    return jobs


def update_progress(
    session: Session, job_id: str, *, step: int | None = None, total_steps: int | None = None
) -> bool:
    """Record progress and a heartbeat for a job that is not terminal; returns whether it was updated."""
    now = utcnow()
    values: dict[str, Any] = {"heartbeat_at": now, "updated_at": now}
    if step is not None:
        values["step"] = step
    if total_steps is not None:
        values["total_steps"] = total_steps
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.not_in(TERMINAL_STATUSES))
        .values(**values)
        .execution_options(synchronize_session="fetch")
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def set_ray_submission(session: Session, job_id: str, submission_id: str) -> bool:
    """Record the Ray submission id of a job; returns whether the job exists."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(ray_submission_id=submission_id, updated_at=utcnow())
        .execution_options(synchronize_session="fetch")
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def oldest_queued(session: Session, limit: int = 1) -> list[Job]:
    """The head of the dispatch queue (oldest first), without claiming anything."""
    return list(
        session.scalars(
            select(Job).where(Job.status == JobStatus.QUEUED.value).order_by(Job.seq).limit(limit)
        )
    )


def set_queue_reasons(session: Session, reasons: Mapping[str, str]) -> None:
    """Record why each of these queued jobs waits (jobs no longer queued are left alone)."""
    if not reasons:
        return
    session.connection().execute(
        update(Job.__table__)
        .where(Job.__table__.c.id == bindparam("job_id"), Job.__table__.c.status == JobStatus.QUEUED.value)
        .values(queue_reason=bindparam("reason")),
        [{"job_id": job_id, "reason": reason} for job_id, reason in reasons.items()],
    )


def queued_span(session: Session) -> tuple[int | None, int | None]:
    """The seqs of the oldest and the newest queued job (None, None when none): two index lookups."""
    row = session.execute(
        select(func.min(Job.seq), func.max(Job.seq)).where(Job.status == JobStatus.QUEUED.value)
    ).one()
    return row[0], row[1]


def active_jobs(session: Session) -> list[Job]:
    """Jobs the dispatcher watches: every running job, oldest first."""
    return list(session.scalars(select(Job).where(Job.status == JobStatus.RUNNING.value).order_by(Job.seq)))


def record_attempt(session: Session, job_id: str) -> int:
    """Count one more attempt of a running job (a resubmission after its Ray job was lost); returns the count."""
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(attempt=Job.attempt + 1, updated_at=utcnow())
        .execution_options(synchronize_session="fetch")
    )
    return int(session.scalar(select(Job.attempt).where(Job.id == job_id)) or 0)
