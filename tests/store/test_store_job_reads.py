"""The ORM-free job read behind GET /v1/jobs/{id}: same fields as the ORM, queue position, project scope."""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor

import pytest

from core.store import (
    JOB_VIEW_COLUMNS,
    Database,
    JobError,
    JobRow,
    claim_queued,
    get_job,
    queue_position,
    read_job_row,
    read_job_row_async,
    transition,
)
from core.store.jobs import _JOB_ROWS_BY_IDS
from tests.store.test_store_jobs import new_job

FIELDS = JOB_VIEW_COLUMNS


def _read(db: Database, job_id: str, project: str | None = None) -> JobRow | None:
    found = read_job_row(db, job_id, project=project)  # what GET /v1/jobs/{id} uses
    if db.is_sqlite:  # on the connection this thread keeps: no transaction left open between reads
        assert not db._held.in_transaction()
    return found


def test_row_read_matches_the_orm_and_counts_the_queue(db: Database) -> None:
    first, second, third = new_job(db, "a"), new_job(db, "b"), new_job(db, "a", group_id="g1")
    with db.write() as s:
        assert [j.id for j in claim_queued(s, 1, "w")] == [first]
        transition(s, first, "failed", error=JobError("boom", "it broke"))
    for job_id in (first, second, third):
        found = _read(db, job_id)
        assert found is not None
        with db.read() as s:
            job = get_job(s, job_id)
            assert job is not None
            assert {f: getattr(found.row, f) for f in FIELDS} == {f: getattr(job, f) for f in FIELDS}
            assert found.queue_position == queue_position(s, job)
    failed = _read(db, first)
    assert failed.queue_position is None and failed.row.finished_at is not None
    assert (failed.row.error_code, failed.row.error_message) == ("boom", "it broke")
    assert [_read(db, j).queue_position for j in (second, third)] == [1, 2]  # all projects queue together


def test_row_read_is_scoped_by_project(db: Database) -> None:
    job_id = new_job(db, "a")
    assert _read(db, job_id, "a") is not None
    assert _read(db, job_id, "b") is None
    assert _read(db, "job_missing") is None


def test_async_read_matches_the_sync_read(db: Database) -> None:
    running, queued = new_job(db, "a"), new_job(db, "a")
    with db.write() as s:
        claim_queued(s, 1, "w")

    async def read_all() -> list[JobRow | None]:
        try:
            return [
                await read_job_row_async(db, running),
                await read_job_row_async(db, queued, project="a"),
                await read_job_row_async(db, queued, project="b"),
            ]
        finally:
            await db.close_async_reads()

    with ThreadPoolExecutor(1) as pool:  # a loop of its own, even if another test left one running here
        got = pool.submit(asyncio.run, read_all()).result()
    assert got[2] is None
    for job_id, found in zip((running, queued), got[:2], strict=True):
        expected = _read(db, job_id)
        assert found is not None and expected is not None
        assert found.queue_position == expected.queue_position
        assert {f: getattr(found.row, f) for f in FIELDS} == {f: getattr(expected.row, f) for f in FIELDS}
    assert got[1].queue_position == 1


def test_concurrent_async_reads_share_queries_and_keep_their_scope(db: Database) -> None:
    if db.is_sqlite:
        pytest.skip("SQLite reads run inline, one at a time")
    a1, a2, b1 = new_job(db, "a"), new_job(db, "a"), new_job(db, "b")
    asks = [(a1, "a"), (a2, None), (b1, "a"), (b1, "b"), ("job_missing", None), (a1, "a"), (a2, "b")] * 3

    async def read_all() -> tuple[list[JobRow | None], int]:
        try:
            got = await asyncio.gather(*(read_job_row_async(db, j, project=p) for j, p in asks))
            return list(got), db._async_reads().batch(db._point_query(_JOB_ROWS_BY_IDS), "id").queries
        finally:
            await db.close_async_reads()

    with ThreadPoolExecutor(1) as pool:
        got, queries = pool.submit(asyncio.run, read_all()).result()
    assert queries == 1, queries  # the 21 reads of one loop turn took one round trip
    for (job_id, project), found in zip(asks, got, strict=True):
        expected = _read(db, job_id, project)
        if expected is None:
            assert found is None, (job_id, project)
        else:
            assert found is not None and found.row.id == job_id
            assert found.queue_position == expected.queue_position
            assert {f: getattr(found.row, f) for f in FIELDS} == {f: getattr(expected.row, f) for f in FIELDS}


def test_a_key_the_database_refuses_fails_no_other_read(db: Database) -> None:
    if db.is_sqlite:
        pytest.skip("SQLite reads run inline, one at a time")
    job_id = new_job(db, "a")

    async def read_all() -> list[object]:
        try:
            return await asyncio.gather(
                db.read_by_key(_JOB_ROWS_BY_IDS, "id", job_id),
                db.read_by_key(_JOB_ROWS_BY_IDS, "id", "bad\x00id"),  # PostgreSQL text refuses NUL
                read_job_row_async(db, "job\x00x"),
                return_exceptions=True,
            )
        finally:
            await db.close_async_reads()

    with ThreadPoolExecutor(1) as pool:
        good, bad, via_api = pool.submit(asyncio.run, read_all()).result()
    assert getattr(good, "id", None) == job_id  # its batch-mate's error did not reach it
    assert isinstance(bad, Exception)
    assert via_api is None  # the API's read answers "no such job" for an id no row can have


def test_reads_from_other_threads_borrow_a_connection(db: Database) -> None:
    job_ids = [new_job(db, "a") for _ in range(3)]
    assert _read(db, job_ids[0]) is not None  # this thread keeps a connection (on SQLite)
    with ThreadPoolExecutor(4) as pool:  # more threads than the point-read pool keeps
        found = list(pool.map(lambda j: read_job_row(db, j), job_ids * 4))
    assert [f.row.id for f in found] == job_ids * 4


def test_the_batch_runs_in_no_readers_context(db: Database) -> None:
    if db.is_sqlite:
        pytest.skip("SQLite reads run inline, one at a time")
    job_id = new_job(db, "a")
    request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
    seen: list[str | None] = []

    async def read_as(rid: str) -> JobRow | None:
        request_id.set(rid)  # what the API's request middleware does for each request
        return await read_job_row_async(db, job_id)

    async def read_all() -> list[JobRow | None]:
        reads = db._async_reads()
        fetch = reads.fetch

        async def recording_fetch(*args: object, **kwargs: object) -> list[object]:
            seen.append(request_id.get())
            return await fetch(*args, **kwargs)

        reads.fetch = recording_fetch  # type: ignore[method-assign]
        try:
            return await asyncio.gather(read_as("req-1"), read_as("req-2"))
        finally:
            await db.close_async_reads()

    with ThreadPoolExecutor(1) as pool:
        got = pool.submit(asyncio.run, read_all()).result()
    assert [g.row.id for g in got] == [job_id, job_id]
    assert seen == [None]  # one query, logged under no request's id
