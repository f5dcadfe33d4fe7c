"""Job queries: idempotent create, project-scoped reads, cursor pages, guarded transitions, cancel."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import ARRAY, String, any_, bindparam, case, delete, func, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.failures import JobFailure
from core.store.db import Database
from core.store.errors import IdempotencyConflictError, InvalidCursorError, NotFoundError
from core.store.events import append_event
from core.store.ids import new_job_id
from core.store.models import TERMINAL_STATUSES, IdempotencyKey, Job, JobStatus, utcnow
from core.store.projects import ensure_project

#: Legal moves of the public lifecycle; a terminal state has none (it is final).
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "failed", "cancelled"}),
    "running": frozenset({"succeeded", "failed", "cancelled"}),
}
MAX_PAGE = 1000


JobError = JobFailure
"""The store's name for core.failures.JobFailure: why a job failed (the API's `error: {code, message}`)."""


@dataclass(frozen=True)
class JobPage:
    """One page of `list_jobs`: newest first; `next_cursor` is None on the last page."""

    data: list[Job]
    next_cursor: str | None


def spec_to_json(spec: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object stored for a spec (a pydantic model is dumped with its defaults)."""
    if isinstance(spec, BaseModel):
        return spec.model_dump(mode="json")
    return json.loads(json.dumps(dict(spec), allow_nan=False))


def request_hash(spec_json: Mapping[str, Any], group_id: str | None = None) -> str:
    """SHA-256 of the canonical JSON of a create request (what an Idempotency-Key is bound to)."""
    body = {"spec": spec_json, "group_id": group_id}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _status(value: str) -> str:
    try:
        return JobStatus(value).value
    except ValueError:
        raise ValueError(
            f"unknown job status {value!r}; one of {', '.join(s.value for s in JobStatus)}"
        ) from None


def _replay(session: Session, row: IdempotencyKey, digest: str) -> tuple[Job, bool]:
    if row.request_hash != digest:
        raise IdempotencyConflictError(row.key, row.job_id)
    job = session.scalars(select(Job).where(Job.id == row.job_id)).one()
    return job, False


def _find_key(session: Session, project: str, key: str) -> IdempotencyKey | None:
    return session.scalars(
        select(IdempotencyKey)
        .where(IdempotencyKey.project == project, IdempotencyKey.key == key)
        .execution_options(populate_existing=True)
    ).one_or_none()


def create_job(
    session: Session,
    *,
    project: str,
    spec: BaseModel | Mapping[str, Any],
    name: str | None = None,
    idempotency_key: str | None = None,
    group_id: str | None = None,
    total_steps: int | None = None,
) -> tuple[Job, bool]:
    """Create a queued job; returns (job, created).

    With `idempotency_key` (unique per project): the same key and body returns the first job with
    created=False; the same key with another body raises IdempotencyConflictError. Safe under
    concurrent callers (a losing insert is rolled back to a savepoint and the winner's job returned).
    """
    if idempotency_key is not None and not 0 < len(idempotency_key) <= 255:
        raise ValueError("Idempotency-Key must be 1 to 255 characters")
    spec_json = spec_to_json(spec)
    job_name = name or str(spec_json.get("name") or "job")
    digest = request_hash(spec_json, group_id)
    ensure_project(session, project)
    if idempotency_key is not None and (row := _find_key(session, project, idempotency_key)) is not None:
        return _replay(session, row, digest)
    now = utcnow()
    job = Job(
        id=new_job_id(),
        project=project,
        name=job_name,
        status=JobStatus.QUEUED.value,
        cancel_requested=False,
        spec=spec_json,
        group_id=group_id,
        created_at=now,
        updated_at=now,
        step=0,
        total_steps=total_steps,
        attempt=0,
        last_event_seq=0,
    )
    if idempotency_key is None:
        session.add(job)
        session.flush()
    else:
        try:
            with session.begin_nested():
                session.add(job)
                session.flush()
                session.add(
                    IdempotencyKey(
                        project=project,
                        key=idempotency_key,
                        request_hash=digest,
                        job_id=job.id,
                        created_at=now,
                    )
                )
                session.flush()
        except IntegrityError:
            row = _find_key(session, project, idempotency_key)
            if row is None:
                raise
            return _replay(session, row, digest)
    append_event(
        session, job.id, "status", "job queued", {"from": None, "to": "queued"}, dedup_key="status:queued"
    )
    return job, True


def _scoped(stmt: Any, project: str | None) -> Any:
    return stmt if project is None else stmt.where(Job.project == project)


# Built once: a statement object memoizes its compiled-cache key, so the hottest read (GET a job) skips
# building the expression and hashing it on every call.
_JOBS = Job.__table__


def _queued_ahead(seq: Any) -> Any:
    """Queued jobs (all projects) before `seq`: one index-range count on (status, seq)."""
    earlier = _JOBS.alias("earlier")
    return (
        select(func.count())
        .where(earlier.c.status == JobStatus.QUEUED.value, earlier.c.seq < seq)
        .scalar_subquery()
    )


_QUEUED_AHEAD = select(_JOBS.c.seq, _queued_ahead(_JOBS.c.seq)).where(
    _JOBS.c.seq.in_(bindparam("seqs", expanding=True))
)
"""(seq, queued jobs ahead of it) for the given seqs."""
# What the API shows of a job (JobRow.row), and for a queued job only the jobs ahead of it: one
# statement, one round trip.
JOB_VIEW_COLUMNS = (
    "id", "project", "name", "status", "cancel_requested", "spec", "group_id", "created_at", "updated_at",
    "started_at", "finished_at", "step", "total_steps", "latest_metrics", "error_code", "error_message",
    "attempt", "seq", "queue_reason",
)  # fmt: skip
_JOB_VIEW = select(
    *(_JOBS.c[name] for name in JOB_VIEW_COLUMNS),
    case((_JOBS.c.status == JobStatus.QUEUED.value, _queued_ahead(_JOBS.c.seq))).label("queued_ahead"),
)
_JOB_ROW_BY_ID = _JOB_VIEW.where(_JOBS.c.id == bindparam("job_id"))
_JOB_ROW_BY_ID_IN_PROJECT = _JOB_ROW_BY_ID.where(_JOBS.c.project == bindparam("project"))
# PostgreSQL: the same rows for a list of ids (the event loop's coalesced reads).
_JOB_ROWS_BY_IDS = _JOB_VIEW.where(_JOBS.c.id == any_(bindparam("keys", type_=ARRAY(String))))


def queue_positions(session: Session | Connection, seqs: list[int]) -> dict[int, int]:
    """1-based dispatch-queue position (all projects) of each queued job's seq (pass queued jobs only)."""
    if not seqs:
        return {}
    return {seq: int(ahead) + 1 for seq, ahead in session.execute(_QUEUED_AHEAD, {"seqs": seqs})}


@dataclass(frozen=True)
class JobRow:
    """A row of the jobs table (columns named like Job's attributes) and its 1-based queue position."""

    row: Any
    queue_position: int | None

    @classmethod
    def of(cls, row: Any) -> JobRow | None:
        """From a `_JOB_VIEW` row (its last column: queued jobs ahead, or NULL when not queued)."""
        if row is None:
            return None
        return cls(row, None if row.queued_ahead is None else int(row.queued_ahead) + 1)


def _job_row_query(job_id: str, project: str | None) -> tuple[Any, dict[str, str]]:
    if project is None:
        return _JOB_ROW_BY_ID, {"job_id": job_id}
    return _JOB_ROW_BY_ID_IN_PROJECT, {"job_id": job_id, "project": project}


def read_job_row(db: Database, job_id: str, *, project: str | None = None) -> JobRow | None:
    """The job's row and queue position without the ORM (the hot read path behind GET /v1/jobs/{id})."""
    return JobRow.of(db.read_point(*_job_row_query(job_id, project)))


async def read_job_row_async(db: Database, job_id: str, *, project: str | None = None) -> JobRow | None:
    """`read_job_row` for the event loop: inline on SQLite (a local read); on PostgreSQL the
    loop is free during the round trip, which it shares with the other reads of the same loop turn."""
    if db.is_sqlite:
        return read_job_row(db, job_id, project=project)
    if "\x00" in job_id:  # PostgreSQL text cannot hold NUL: no job has this id
        return None
    row = await db.read_by_key(_JOB_ROWS_BY_IDS, "id", job_id)
    if row is None or (project is not None and row.project != project):
        return None
    return JobRow.of(row)


def job_visible(session: Session, job_id: str, *, project: str | None = None) -> bool:
    """Whether the job exists (in `project`, unless None): one index lookup, no row decoded."""
    return session.execute(_scoped(select(Job.seq).where(Job.id == job_id), project)).first() is not None


def get_job(session: Session, job_id: str, *, project: str | None = None) -> Job | None:
    """The job, or None if it does not exist or belongs to another project (`project=None`: any)."""
    return session.scalars(_scoped(select(Job).where(Job.id == job_id), project)).one_or_none()


def require_job(session: Session, job_id: str, *, project: str | None = None) -> Job:
    """Like `get_job` but raises NotFoundError instead of returning None."""
    job = get_job(session, job_id, project=project)
    if job is None:
        raise NotFoundError(f"job {job_id} not found")
    return job


def encode_cursor(seq: int) -> str:
    """Opaque cursor for the position just after the job with this `seq` (newest-first order)."""
    return base64.urlsafe_b64encode(f"j1:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The `seq` inside a cursor made by `encode_cursor`; raises InvalidCursorError otherwise."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, number = raw.partition(":")
        if prefix != "j1" or not number.isdigit():
            raise ValueError
        return int(number)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidCursorError(f"invalid cursor {cursor!r}") from None


def _status_filter(stmt: Any, status: str | Iterable[str] | None) -> Any:
    if status is None:
        return stmt
    statuses = [_status(status)] if isinstance(status, str) else [_status(s) for s in status]
    return stmt.where(Job.status.in_(statuses))


def list_jobs(
    session: Session,
    *,
    project: str | None = None,
    status: str | Iterable[str] | None = None,
    group_id: str | None = None,
    limit: int = 50,
    after: str | None = None,
) -> JobPage:
    """A page of jobs, newest first. Pass `next_cursor` back as `after` for the next page.

    The cursor is the last job's `seq`, so pages stay stable while jobs are created: new jobs sort
    before the cursor and never shift or repeat rows of later pages. Raises InvalidCursorError.
    """
    limit = max(1, min(int(limit), MAX_PAGE))
    stmt = _status_filter(_scoped(select(Job), project), status)
    if group_id is not None:
        stmt = stmt.where(Job.group_id == group_id)
    if after is not None:
        stmt = stmt.where(Job.seq < decode_cursor(after))
    rows = list(session.scalars(stmt.order_by(Job.seq.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return JobPage(data=rows, next_cursor=encode_cursor(rows[-1].seq) if more else None)


def count_jobs(
    session: Session, *, project: str | None = None, status: str | Iterable[str] | None = None
) -> int:
    """How many jobs match (e.g. running jobs, for a concurrency limit)."""
    stmt = _status_filter(_scoped(select(func.count()).select_from(Job), project), status)
    return int(session.scalar(stmt) or 0)


def queue_position(session: Session, job: Job) -> int | None:
    """1-based position of a queued job in the dispatch queue (all projects), or None if not queued."""
    if job.status != JobStatus.QUEUED.value:
        return None
    return queue_positions(session, [job.seq]).get(job.seq)


def transition(
    session: Session,
    job_id: str,
    to_status: str,
    *,
    error: JobFailure | tuple[str, str] | None = None,
    expected_from: str | Iterable[str] | None = None,
    message: str | None = None,
) -> bool:
    """Move a job to `to_status` if the lifecycle allows it; returns whether it changed.

    The job row is locked (``SELECT ... FOR UPDATE`` on PostgreSQL) and the UPDATE is conditional
    on the status read, so concurrent writers cannot make an illegal move. `expected_from` narrows
    the allowed source states. A terminal state is final. A status event (dedup key
    ``status:<to>``) is appended in the same transaction. Raises NotFoundError, ValueError.
    """
    to = _status(to_status)
    allowed = {src for src, targets in TRANSITIONS.items() if to in targets}
    if expected_from is not None:
        wanted = [expected_from] if isinstance(expected_from, str) else list(expected_from)
        allowed &= {_status(s) for s in wanted}
    current = session.scalar(select(Job.status).where(Job.id == job_id).with_for_update())
    if current is None:
        raise NotFoundError(f"job {job_id} not found")
    if current not in allowed:
        return False
    now = utcnow()
    values: dict[str, Any] = {"status": to, "updated_at": now}
    if to == JobStatus.RUNNING.value:
        values["started_at"] = func.coalesce(Job.started_at, now)
    if to in TERMINAL_STATUSES:
        values["finished_at"] = now
    err = JobFailure(*error) if isinstance(error, tuple) else error
    if err is not None:
        values["error_code"], values["error_message"] = err.code, err.message
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == current)
        .values(**values)
        .execution_options(synchronize_session="fetch")
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    data: dict[str, Any] = {"from": current, "to": to}
    if err is not None:
        data["error"] = {"code": err.code, "message": err.message}
    append_event(session, job_id, "status", message or f"{current} -> {to}", data, dedup_key=f"status:{to}")
    return True


def cancel_job(session: Session, job_id: str, *, project: str | None = None) -> tuple[Job, bool]:
    """Request cancellation; returns (job, changed). Idempotent.

    queued -> cancelled at once; running -> `cancel_requested=True` (the worker stops it and moves
    it to cancelled); terminal, or already requested -> no-op. Raises NotFoundError.
    """
    job = require_job(session, job_id, project=project)
    changed = transition(
        session, job_id, "cancelled", expected_from="queued", message="cancelled before start"
    )
    if not changed:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.cancel_requested.is_(False))
            .values(cancel_requested=True, updated_at=utcnow())
            .execution_options(synchronize_session="fetch")
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            append_event(
                session, job_id, "cancel_requested", "cancellation requested", dedup_key="cancel_requested"
            )
            changed = True
    session.refresh(job)
    return job, changed


def purge_idempotency_keys(session: Session, older_than: datetime) -> int:
    """Forget idempotency keys created before `older_than` (the jobs stay); returns how many."""
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < older_than))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
