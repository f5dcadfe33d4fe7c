"""Job events: append with a per-job increasing `seq` (commit order) and optional dedup keys; list after a seq."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.store.errors import NotFoundError
from core.store.models import TERMINAL_STATUSES, Job, JobEvent, utcnow
from core.store.webhooks import enqueue_for_event
from core.webhooks import webhook_type

ONCE_PER_JOB_KINDS = frozenset({"final_model"})
"""Kinds a job records at most once: their kind is their dedup key (the driver and the loop both report them)."""
AFTER_TERMINAL_KINDS = frozenset({"webhook"})
"""Kinds a finished job still records (webhook delivery outcomes), besides the move to its terminal status."""


def _existing(session: Session, job_id: str, dedup_key: str) -> JobEvent | None:
    return session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.dedup_key == dedup_key)
    ).one_or_none()


def _after_terminal(kind: str, data: dict[str, Any] | None) -> bool:
    """Whether a finished job takes this event: the move to its terminal status itself, or a webhook outcome."""
    is_terminal_move = kind == "status" and (data or {}).get("to") in TERMINAL_STATUSES
    return is_terminal_move or kind in AFTER_TERMINAL_KINDS


def append_event(
    session: Session,
    job_id: str,
    kind: str,
    message: str = "",
    data: dict[str, Any] | None = None,
    *,
    dedup_key: str | None = None,
) -> tuple[JobEvent | None, bool]:
    """Append an event; returns (event, created). With `dedup_key`, a repeat returns the first event.

    A finished job (terminal status) takes no more events but its status move and webhook outcomes:
    a late one returns (None, False). Kinds in ONCE_PER_JOB_KINDS are deduplicated by their kind.

    The seq comes from `jobs.last_event_seq`, bumped by an UPDATE that row-locks the job until
    commit, so seqs of one job commit in increasing order: a reader resuming after seq N (SSE
    `Last-Event-ID`) never misses an event committed later with a smaller seq. A repeat racing the
    first append may leave a gap in seqs (never a duplicate). Status moves and checkpoints also queue
    the job's webhook deliveries in the same transaction. Raises NotFoundError for an unknown job.
    """
    if dedup_key is None and kind in ONCE_PER_JOB_KINDS:
        dedup_key = kind
    if dedup_key is not None and (found := _existing(session, job_id, dedup_key)) is not None:
        return found, False
    bump = update(Job).where(Job.id == job_id)
    if not _after_terminal(kind, data):  # evaluated under the row lock: a racing finish wins
        bump = bump.where(Job.status.not_in(TERMINAL_STATUSES))
    seq = session.execute(
        bump.values(last_event_seq=Job.last_event_seq + 1).returning(Job.last_event_seq)
    ).scalar_one_or_none()
    if seq is None:
        if session.scalar(select(Job.status).where(Job.id == job_id)) is None:
            raise NotFoundError(f"job {job_id} not found")
        return None, False  # the job has finished: nothing is recorded after its terminal status
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
