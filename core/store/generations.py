"""Eval generations of a job: one row per (job, eval step) holding its samples, recorded idempotently."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from core.spec import MAX_EVAL_GENERATIONS, MAX_GENERATION_STEPS, MAX_GENERATION_TEXT_CHARS
from core.store.errors import NotFoundError
from core.store.jobs import job_visible
from core.store.models import EvalGeneration, utcnow
from core.store.projects import dialect_insert

_FIELDS = ("prompt", "chosen", "completion")


def _sample(index: int, sample: Mapping[str, Any]) -> dict[str, Any]:
    """A row's sample: the loop's limits enforced again here, since the store takes what a worker sends."""
    return {"index": index, **{k: str(sample.get(k) or "")[:MAX_GENERATION_TEXT_CHARS] for k in _FIELDS}}


def add_generations(session: Session, job_id: str, step: int, samples: Sequence[Mapping[str, Any]]) -> bool:
    """Record a step's samples (at most MAX_EVAL_GENERATIONS, texts cut to MAX_GENERATION_TEXT_CHARS);
    returns whether it was new.

    A step reported again (a retried worker) keeps its first samples. A job keeps MAX_GENERATION_STEPS
    steps: the first (the earliest answers, to compare with) and the latest; those between go as new
    ones come. Raises NotFoundError.
    """
    if not job_visible(session, job_id):
        raise NotFoundError(f"job {job_id} not found")
    rows = [_sample(i, s) for i, s in enumerate(samples[:MAX_EVAL_GENERATIONS])]
    inserted = session.scalar(
        dialect_insert(session, EvalGeneration)
        .values(job_id=job_id, step=step, samples=rows, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["job_id", "step"])
        .returning(EvalGeneration.step)
    )
    if inserted is None:
        return False
    first, cutoff = _drop_middle_steps(session, job_id)
    return not first < step < cutoff  # a step re-reported after its turn has gone is not kept


def _drop_middle_steps(session: Session, job_id: str) -> tuple[int, int]:
    """Keep the job's first step and its latest MAX_GENERATION_STEPS - 1 (a delete of bounded size);
    returns the first step and the oldest of the latest (the steps strictly between them are gone)."""
    of_job = EvalGeneration.job_id == job_id
    step = EvalGeneration.step
    newest = select(step).where(of_job).order_by(step.desc())
    cutoff = session.scalar(newest.offset(MAX_GENERATION_STEPS - 2).limit(1))
    if cutoff is None:  # fewer steps than the cap
        return 0, 0
    first = session.scalar(select(func.min(step)).where(of_job))
    session.execute(delete(EvalGeneration).where(of_job, step > first, step < cutoff))
    return first, cutoff


def generation_steps(session: Session, job_id: str) -> list[int]:
    """The eval steps that have generations, ascending."""
    query = select(EvalGeneration.step).where(EvalGeneration.job_id == job_id).order_by(EvalGeneration.step)
    return list(session.scalars(query))


def get_generations(session: Session, job_id: str, step: int) -> EvalGeneration | None:
    """The generations of one eval step, or None."""
    return session.get(EvalGeneration, (job_id, step))
