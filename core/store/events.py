"""Job events: append with a per-job increasing `seq` (commit order) and optional dedup keys; list after a seq."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.store.errors import NotFoundError
from core.store.models import Job, JobEvent, utcnow
from core.store.webhooks import enqueue_for_event
from core.webhooks import webhook_type


def _existing(session: Session, job_id: str, dedup_key: str) -> JobEvent | None:
    return session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.dedup_key == dedup_key)
    ).one_or_none()


def append_event(
    session: Session,
    job_id: str,
    kind: str,
    message: str = "",
    data: dict[str, Any] | None = None,
    *,
    dedup_key: str | None = None,
) -> tuple[JobEvent, bool]:
    """Append an event; returns (event, created). With `dedup_key`, a repeat returns the first event.

        The seq comes from `jobs.last_event_seq`, bumped by an UPDATE that row-locks the job until
        commit, so seqs of one job commit in increasing order: a reader resuming after seq N (SSE
        `Last-Event-ID`) never misses an event committed later with a smaller seq. A repeat racing the
        first append may leave a gap in seqs (never a duplicate). Status moves and checkpoints also queue
    the job's webhook deliveries in the same transaction. Raises NotFoundError for an unknown job.
    """
    if dedup_key is not None and (found := _existing(session, job_id, dedup_key)) is not None:
        return found, False
    seq = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(last_event_seq=Job.last_event_seq + 1)
        .returning(Job.last_event_seq)
    ).scalar_one_or_none()
    if seq is None:
        raise NotFoundError(f"job {job_id} not found")
    if dedup_key is not None and (found := _existing(session, job_id, dedup_key)) is not None:
        return found, False
    event = JobEvent(
        job_id=job_id,
        seq=seq,
        kind=kind,
        message=message,
        data=data,
        dedup_key=dedup_key,
        created_at=utcnow(),
    )
    session.add(event)
    session.flush()
    if webhook_type(kind, data) is not None:
        job = session.scalars(
            select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
        ).one()
        enqueue_for_event(session, job, event)
    return event, True


def list_events(session: Session, job_id: str, *, after_seq: int = 0, limit: int = 100) -> list[JobEvent]:
    """Events of a job with seq > `after_seq`, oldest first, at most `limit`."""
    return list(
        session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
            .order_by(JobEvent.seq)
            .limit(limit)
        )
    )


def last_event_seq(session: Session, job_id: str) -> int:
    """The highest seq handed out for a job so far (0 if none); raises NotFoundError for an unknown job."""
    value = session.scalar(select(Job.last_event_seq).where(Job.id == job_id))
    if value is None:
        raise NotFoundError(f"job {job_id} not found")
    return value
