"""Eval generations of a job: one row per (job, eval step) holding its samples, recorded idempotently."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.store.errors import NotFoundError
from core.store.models import EvalGeneration, Job, utcnow
from core.store.projects import dialect_insert

MAX_SAMPLES = 32
MAX_TEXT_CHARS = 4000
_FIELDS = ("prompt", "chosen", "completion")


def _sample(index: int, sample: Mapping[str, Any]) -> dict[str, Any]:
    return {"index": index, **{k: str(sample.get(k) or "")[:MAX_TEXT_CHARS] for k in _FIELDS}}


def add_generations(session: Session, job_id: str, step: int, samples: Sequence[Mapping[str, Any]]) -> bool:
    """Record a step's samples (at most MAX_SAMPLES, texts cut to MAX_TEXT_CHARS); returns whether it was new.

    A step reported again (a retried worker) keeps its first samples. Raises NotFoundError.
    """
    if session.scalar(select(Job.seq).where(Job.id == job_id)) is None:
        raise NotFoundError(f"job {job_id} not found")
    rows = [_sample(i, s) for i, s in enumerate(samples[:MAX_SAMPLES])]
    inserted = session.scalar(
        dialect_insert(session, EvalGeneration)
        .values(job_id=job_id, step=step, samples=rows, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["job_id", "step"])
        .returning(EvalGeneration.step)
    )
    return inserted is not None


def generation_steps(session: Session, job_id: str) -> list[int]:
    """The eval steps that have generations, ascending."""
    query = select(EvalGeneration.step).where(EvalGeneration.job_id == job_id).order_by(EvalGeneration.step)
    return list(session.scalars(query))


def get_generations(session: Session, job_id: str, step: int) -> EvalGeneration | None:
    """The generations of one eval step, or None."""
    return session.get(EvalGeneration, (job_id, step))
