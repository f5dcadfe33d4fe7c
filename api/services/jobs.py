"""Job use cases over core.store: create (idempotent), list, get, cancel, metrics, checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Row, func, select
from sqlalchemy.orm import Session

from api.errors import ProblemError, not_found
from api.services.auth import Principal
from api.services.hub_datasets import HubDatasetLookup
from api.services.specs import CheckedSpec, SpecLookups
from core.schemas import (
    CheckpointList,
    CheckpointOut,
    EventOut,
    EventPage,
    JobError,
    JobOut,
    JobPage,
    MetricSeries,
    Progress,
)
from core.store import (
    Database,
    IdempotencyConflictError,
    InvalidCursorError,
    Job,
    JobRow,
    JobStatus,
    NotFoundError,
    cancel_job,
    create_job,
    final_model_path,
    get_dataset,
    job_error_payload,
    job_visible,
    list_checkpoints,
    list_events,
    list_jobs,
    metric_series,
    queue_positions,
    read_job_row_async,
)

MAX_IDEMPOTENCY_KEY = 255


def spec_lookups(
    db: Database, principal: Principal, hub_dataset: HubDatasetLookup | None = None
) -> SpecLookups:
    """Resolve a spec's `ds_...` ids to stored files and job ids to final models, as visible to the caller."""

    def dataset(dataset_id: str) -> str | None:
        with db.read() as session:
            row = get_dataset(session, dataset_id, project=principal.scope)
            return row.path if row is not None else None

    def final_model(job_id: str) -> str | None:
        with db.read() as session:
            if not job_visible(session, job_id, project=principal.scope):
                return None
            path = final_model_path(session, job_id)
        return path if path is not None and Path(path).is_dir() else None

    return SpecLookups(dataset=dataset, final_model=final_model, hub_dataset=hub_dataset)


def _queue_positions(session: Session, jobs: Sequence[Job]) -> dict[str, int]:
    """1-based queue position of each queued job among `jobs`, by job id."""
    queued = {j.seq: j.id for j in jobs if j.status == JobStatus.QUEUED.value}
    return {queued[seq]: pos for seq, pos in queue_positions(session, list(queued)).items()}


def to_out(job: Job | Row[Any], queue_position: int | None = None) -> JobOut:
    """The API view of a job (an ORM object or a row of the jobs table)."""
    error = job_error_payload(job.error_code, job.error_message)
    return JobOut(
        id=job.id,
        name=job.name,
        project=job.project,
        status=job.status,
        cancel_requested=bool(job.cancel_requested),
        spec=job.spec,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        progress=Progress(step=job.step or 0, total_steps=job.total_steps),
        metrics=job.latest_metrics,
        error=JobError(**error) if error else None,
        queue_position=queue_position,
        queue_reason=job.queue_reason if job.status == JobStatus.QUEUED.value else None,
        attempt=job.attempt or 0,
        group=job.group_id,
    )


def ensure_visible(session: Session, principal: Principal, job_id: str) -> None:
    """404 unless the job exists in the principal's scope (an index lookup; no row is loaded)."""
    if not job_visible(session, job_id, project=principal.scope):
        raise not_found("job", job_id)


def create(
    db: Database, principal: Principal, checked: CheckedSpec, idempotency_key: str | None
) -> tuple[JobOut, bool]:
    """Store a queued job; the same Idempotency-Key and body returns the first job (created=False)."""
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        raise ProblemError(
            400,
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters",
            errors=[{"loc": "header.Idempotency-Key", "msg": "bad length"}],
        )
    try:
        with db.write() as session:
            job, created = create_job(
                session,
                project=principal.owner,
                spec=checked.resolved,
                idempotency_key=idempotency_key,
                group_id=checked.resolved.group,
            )
            position = _queue_positions(session, [job]).get(job.id)
            out = to_out(job, position)
    except IdempotencyConflictError as exc:
        raise ProblemError(
            409,
            f"Idempotency-Key '{exc.key}' was already used with a different request body (job {exc.job_id}); "
            "use a new key for a new job",
        ) from exc
    return out, created


def list_page(
    db: Database,
    principal: Principal,
    *,
    status: str | None,
    after: str | None,
    limit: int,
    group: str | None = None,
) -> JobPage:
    """A page of the caller's jobs, newest first."""
    try:
        with db.read() as session:
            page = list_jobs(
                session, project=principal.scope, status=status, group_id=group, limit=limit, after=after
            )
            positions = _queue_positions(session, page.data)
            return JobPage(
                data=[to_out(j, positions.get(j.id)) for j in page.data], next_cursor=page.next_cursor
            )
    except InvalidCursorError as exc:
        raise ProblemError(
            400,
            "The 'after' cursor is not valid: pass next_cursor from a previous page",
            errors=[{"loc": "query.after", "msg": str(exc)}],
        ) from exc


def _found_or_404(found: JobRow | None, job_id: str) -> JobOut:
    if found is None:
        raise not_found("job", job_id)
    return to_out(found.row, found.queue_position)


async def get_async(db: Database, principal: Principal, job_id: str) -> JobOut:
    """`get` for the event loop: inline on SQLite (a local read), on held async connections on PostgreSQL."""
    return _found_or_404(await read_job_row_async(db, job_id, project=principal.scope), job_id)


def cancel(db: Database, principal: Principal, job_id: str) -> JobOut:
    """Request cancellation (idempotent): queued jobs are cancelled at once, running ones flagged."""
    try:
        with db.write() as session:
            job, _changed = cancel_job(session, job_id, project=principal.scope)
            return to_out(job, _queue_positions(session, [job]).get(job.id))
    except NotFoundError as exc:
        raise not_found("job", job_id) from exc


def events(db: Database, principal: Principal, job_id: str, *, after: int, limit: int) -> EventPage:
    """Stored events after seq `after`, oldest first (the JSON view of the event stream)."""
    with db.read() as session:
        ensure_visible(session, principal, job_id)
        rows = list_events(session, job_id, after_seq=after, limit=limit)
        data = [
            EventOut(seq=e.seq, kind=e.kind, message=e.message, data=e.data, time=e.created_at) for e in rows
        ]
    return EventPage(data=data, next_after=data[-1].seq if len(data) == limit else None)


def parse_names(values: Sequence[str] | None) -> list[str] | None:
    """`names=a,b` and `names=a&names=b` both work."""
    if not values:
        return None
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    return names or None


def metrics(
    db: Database,
    principal: Principal,
    job_id: str,
    *,
    after_step: int | None,
    names: list[str] | None,
    max_points: int | None,
    limit: int,
) -> MetricSeries:
    """A job's metric series, optionally filtered by name and downsampled (first and last kept)."""
    with db.read() as session:
        ensure_visible(session, principal, job_id)
        try:
            series = metric_series(
                session, job_id, after_step=after_step, names=names, max_points=max_points, limit=limit
            )
        except ValueError as exc:
            loc = "query.names" if "metric name" in str(exc) else "query.max_points"
            raise ProblemError(422, str(exc), errors=[{"loc": loc, "msg": str(exc)}]) from exc
    data: list[dict[str, Any]] = [row.as_dict() for row in series.data]
    # built from the store's own rows (int step, float time, float|None values): nothing to validate
    return MetricSeries.model_construct(data=data, next_after_step=series.next_after_step)


def series_json(series: MetricSeries) -> bytes:
    """The series as the route's JSON body, written by orjson (far cheaper than pydantic + json.dumps for a
    long series; bench/API.md); the same document, as tests/api/test_jobs.py checks (and
    test_postgres.py with jsonb's numbers, which metric_series gives back as floats)."""
    return orjson.dumps({"data": series.data, "next_after_step": series.next_after_step})


def checkpoints(db: Database, principal: Principal, job_id: str) -> CheckpointList:
    """A job's checkpoints by step."""
    with db.read() as session:
        ensure_visible(session, principal, job_id)
        rows = list_checkpoints(session, job_id)
        return CheckpointList(
            data=[
                CheckpointOut(step=c.step, path=c.path, created_at=c.created_at, metrics=c.metrics)
                for c in rows
            ]
        )


def count_by_status(db: Database) -> dict[str, int]:
    """Jobs per status over every project (the `minordpo_jobs` gauge)."""
    with db.read() as session:
        rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        return {status: int(count) for status, count in rows}
