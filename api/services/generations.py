"""Eval generations of a job (GET /v1/jobs/{id}/generations): one step's samples and the steps that have them."""

from __future__ import annotations

from api.errors import ProblemError
from api.services.auth import Principal
from api.services.jobs import ensure_visible
from core.schemas import GenerationSample, JobGenerations
from core.store import Database, generation_steps, get_generations


def job_generations(db: Database, principal: Principal, job_id: str, step: int | None) -> JobGenerations:
    """The samples at `step` (default: the latest eval step that has them); 404 for an unknown step or job."""
    with db.read() as session:
        ensure_visible(session, principal, job_id)
        steps = generation_steps(session, job_id)
        if step is None and not steps:
            return JobGenerations(steps=[], step=None, data=[])
        chosen = steps[-1] if step is None else step
        row = get_generations(session, job_id, chosen)
        if row is None:
            raise ProblemError(404, f"job '{job_id}' has no eval generations at step {chosen}")
        data = [GenerationSample.model_validate(sample) for sample in row.samples]
    return JobGenerations(steps=steps, step=chosen, data=data)
