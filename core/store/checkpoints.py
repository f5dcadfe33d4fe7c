"""Checkpoints of a job: one per (job, step), recorded idempotently with a `checkpoint` event; its final model."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from core.store.errors import NotFoundError
from core.store.events import append_event
from core.store.models import Checkpoint, Job, JobEvent, utcnow
from core.store.projects import dialect_insert


def add_checkpoint(
    session: Session, job_id: str, step: int, path: str, metrics: dict[str, Any] | None = None
) -> tuple[Checkpoint, bool]:
    """Record a checkpoint; returns (checkpoint, created).

    Reporting the same step again is a no-op, except that a new `path` replaces the old one (a
    retried worker saved it elsewhere: the newest file is the one that exists). The first report
    appends a ``checkpoint`` event (dedup key ``checkpoint:<step>``). Raises NotFoundError.
    """
    if session.scalar(select(Job.seq).where(Job.id == job_id)) is None:
        raise NotFoundError(f"job {job_id} not found")
    inserted = session.scalar(
        dialect_insert(session, Checkpoint)
        .values(job_id=job_id, step=step, path=path, metrics=metrics, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["job_id", "step"])
        .returning(Checkpoint.step)
    )
    row = session.scalars(
        select(Checkpoint)
        .where(Checkpoint.job_id == job_id, Checkpoint.step == step)
        .execution_options(populate_existing=True)
    ).one()
    if inserted is None:
        if row.path != path:
            row.path = path
            row.metrics = metrics if metrics is not None else row.metrics
            session.flush()
        return row, False
    append_event(
        session,
        job_id,
        "checkpoint",
        f"checkpoint at step {step}",
        {"step": step, "path": path},
        dedup_key=f"checkpoint:{step}",
    )
    return row, True


def list_checkpoints(session: Session, job_id: str) -> list[Checkpoint]:
    """A job's checkpoints by step."""
    return list(
        session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step))
    )


def latest_checkpoint(session: Session, job_id: str) -> Checkpoint | None:
    """The checkpoint with the highest step (what a resumed run starts from), or None."""
    return session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc()).limit(1)
    ).first()


def delete_checkpoint(session: Session, job_id: str, step: int) -> bool:
    """Forget a checkpoint (after its files were rotated away); returns whether it existed."""
    result = session.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def final_model_path(session: Session, job_id: str) -> str | None:
    """Where the job saved its final model (its `final_model` event), or None if it has not."""
    data = session.scalars(
        select(JobEvent.data)
        .where(JobEvent.job_id == job_id, JobEvent.kind == "final_model")
        .order_by(JobEvent.seq.desc())
        .limit(1)
    ).first()
    path = (data or {}).get("path")
    return path if isinstance(path, str) else None
