"""Jobs: idempotent create (also under 50 concurrent callers), scoping, pages, transitions, cancel, claim."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from core.spec import JobSpec
from core.store import (
    Database,
    IdempotencyConflictError,
    InvalidCursorError,
    JobError,
    NotFoundError,
    cancel_job,
    claim_queued,
    count_jobs,
    create_job,
    get_job,
    list_events,
    list_jobs,
    purge_idempotency_keys,
    queue_position,
    require_job,
    set_ray_submission,
    transition,
    update_progress,
)
from core.store.models import utcnow


def spec(name: str = "run", lr: float = 5e-6) -> dict:
    return {"name": name, "model": "m", "dataset": {"train": "d.jsonl"}, "training": {"learning_rate": lr}}


def new_job(db: Database, project: str = "p", **kw) -> str:
    with db.write() as s:
        job, created = create_job(s, project=project, spec=kw.pop("spec", spec()), **kw)
        assert created
        return job.id


def status_of(db: Database, job_id: str) -> str:
    with db.read() as s:
        return require_job(s, job_id).status


def test_create_stores_spec_as_json_and_a_queued_event(db: Database) -> None:
    model = JobSpec.model_validate(spec("hh"))
    with db.write() as s:
        job, created = create_job(s, project="team", spec=model)
    assert created and job.id.startswith("job_") and len(job.id) == 30
    with db.read() as s:
        got = require_job(s, job.id)
        assert got.status == "queued" and got.name == "hh" and got.project == "team"
        assert got.spec == model.model_dump(mode="json")
        assert JobSpec.model_validate(got.spec) == model
        assert got.created_at.tzinfo is not None and got.cancel_requested is False
        assert got.step == 0 and got.attempt == 0 and got.error is None
        events = list_events(s, job.id)
    assert [(e.seq, e.kind, e.data) for e in events] == [(1, "status", {"from": None, "to": "queued"})]


def test_project_scoping(db: Database) -> None:
    job_a = new_job(db, "a")
    new_job(db, "b")
    with db.read() as s:
        assert get_job(s, job_a, project="a") is not None
        assert get_job(s, job_a, project="b") is None
        assert get_job(s, job_a) is not None  # admin
        with pytest.raises(NotFoundError):
            require_job(s, job_a, project="b")
        assert [j.project for j in list_jobs(s, project="b").data] == ["b"]
        assert len(list_jobs(s).data) == 2
        assert count_jobs(s, project="a") == 1 and count_jobs(s) == 2
    with db.write() as s, pytest.raises(NotFoundError):
        cancel_job(s, job_a, project="b")


def test_idempotency_key_same_body_same_job_other_body_conflict(db: Database) -> None:
    with db.write() as s:
        first, created = create_job(s, project="p", spec=spec(), idempotency_key="k1")
    assert created
    with db.write() as s:
        again, created = create_job(s, project="p", spec=spec(), idempotency_key="k1")
    assert not created and again.id == first.id
    with db.write() as s, pytest.raises(IdempotencyConflictError) as info:
        create_job(s, project="p", spec=spec(lr=1e-5), idempotency_key="k1")
    assert info.value.job_id == first.id
    with db.write() as s:  # keys are per project
        other, created = create_job(s, project="q", spec=spec(), idempotency_key="k1")
    assert created and other.id != first.id
    with db.read() as s:
        assert count_jobs(s) == 2


def test_50_concurrent_creates_sharing_10_keys_make_exactly_10_jobs(db: Database) -> None:
    start = threading.Barrier(50)

    def create(i: int) -> tuple[str, str]:
        key = f"key-{i % 10}"
        start.wait(10)
        with db.write() as s:
            job, _ = create_job(s, project="p", spec=spec(name=f"run-{i % 10}"), idempotency_key=key)
            return key, job.id

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(create, range(50)))
    by_key: dict[str, set[str]] = {}
    for key, job_id in results:
        by_key.setdefault(key, set()).add(job_id)
    assert len(by_key) == 10 and all(len(ids) == 1 for ids in by_key.values())
    with db.read() as s:
        assert count_jobs(s) == 10
        assert {j.id for j in list_jobs(s, limit=100).data} == {next(iter(v)) for v in by_key.values()}
    with db.write() as s, pytest.raises(IdempotencyConflictError):
        create_job(s, project="p", spec=spec(name="something-else"), idempotency_key="key-3")


def test_concurrent_same_key_different_bodies_one_wins_rest_conflict(db: Database) -> None:
    start = threading.Barrier(12)

    def create(i: int) -> str:
        start.wait(10)
        try:
            with db.write() as s:
                create_job(s, project="p", spec=spec(name=f"body-{i % 2}"), idempotency_key="shared")
            return f"ok-{i % 2}"
        except IdempotencyConflictError:
            return "conflict"

    with ThreadPoolExecutor(12) as pool:
        outcomes = Counter(pool.map(create, range(12)))
    assert outcomes["conflict"] == 6 and (outcomes["ok-0"], outcomes["ok-1"]) in ((6, 0), (0, 6))
    with db.read() as s:
        assert count_jobs(s) == 1


def test_lifecycle_and_illegal_moves(db: Database) -> None:
    job_id = new_job(db)
    with db.write() as s:
        assert not transition(s, job_id, "succeeded")  # queued -> succeeded is illegal
        assert not transition(s, job_id, "queued")
        assert transition(s, job_id, "running")
        assert not transition(s, job_id, "running")
        assert not transition(s, job_id, "succeeded", expected_from="queued")
        assert transition(s, job_id, "failed", error=JobError("nan_loss", "NaN loss at step 120"))
    for target in ("queued", "running", "succeeded", "failed", "cancelled"):
        with db.write() as s:
            assert not transition(s, job_id, target), f"terminal state moved to {target}"
    with db.read() as s:
        job = require_job(s, job_id)
        assert job.status == "failed" and job.error == {"code": "nan_loss", "message": "NaN loss at step 120"}
        assert (
            job.started_at is not None and job.finished_at is not None and job.finished_at >= job.started_at
        )
        events = [(e.seq, e.data["from"], e.data["to"]) for e in list_events(s, job_id)]
    assert events == [(1, None, "queued"), (2, "queued", "running"), (3, "running", "failed")]
    with db.write() as s:
        with pytest.raises(ValueError):
            transition(s, job_id, "paused")
        with pytest.raises(NotFoundError):
            transition(s, "job_missing", "running")


def test_concurrent_terminal_transitions_exactly_one_wins(db: Database) -> None:
    job_id = new_job(db)
    with db.write() as s:
        assert transition(s, job_id, "running")
    start = threading.Barrier(10)

    def finish(i: int) -> bool:
        start.wait(10)
        with db.write() as s:
            return transition(s, job_id, ["succeeded", "failed", "cancelled"][i % 3])

    with ThreadPoolExecutor(10) as pool:
        assert sum(pool.map(finish, range(10))) == 1
    with db.read() as s:
        assert len([e for e in list_events(s, job_id) if e.kind == "status"]) == 3


def test_cancel_queued_running_terminal_and_twice(db: Database) -> None:
    queued = new_job(db)
    with db.write() as s:
        job, changed = cancel_job(s, queued)
    assert changed and job.status == "cancelled" and job.finished_at is not None
    with db.write() as s:
        job, changed = cancel_job(s, queued)
    assert not changed and job.status == "cancelled"

    running = new_job(db)
    with db.write() as s:
        transition(s, running, "running")
    with db.write() as s:
        job, changed = cancel_job(s, running)
    assert changed and job.status == "running" and job.cancel_requested
    with db.write() as s:
        job, changed = cancel_job(s, running)
    assert not changed and job.cancel_requested
    with db.write() as s:
        assert transition(s, running, "cancelled")
        job, changed = cancel_job(s, running)
    assert not changed and job.status == "cancelled"
    with db.read() as s:
        kinds = [e.kind for e in list_events(s, running)]
    assert kinds == ["status", "status", "cancel_requested", "status"]


def test_claim_is_fifo_and_sets_claim_fields(db: Database) -> None:
    ids = [new_job(db) for _ in range(3)]
    with db.write() as s:
        claimed = claim_queued(s, 2, "dispatcher-1")
    assert [j.id for j in claimed] == ids[:2]
    assert all(j.status == "running" and j.claimed_by == "dispatcher-1" and j.attempt == 1 for j in claimed)
    assert all(j.started_at is not None for j in claimed)
    with db.read() as s:
        assert status_of(db, ids[2]) == "queued"
        assert queue_position(s, require_job(s, ids[2])) == 1
        assert queue_position(s, require_job(s, ids[0])) is None
        assert [e.data["to"] for e in list_events(s, ids[0])] == ["queued", "running"]
    with db.write() as s:
        assert claim_queued(s, 0, "d") == []
        assert [j.id for j in claim_queued(s, 10, "d", max_running=3)] == [ids[2]]
        assert claim_queued(s, 10, "d", max_running=3) == []


def test_concurrent_claimers_never_claim_a_job_twice(db: Database) -> None:
    ids = {new_job(db) for _ in range(40)}
    start = threading.Barrier(8)

    def claimer(worker: int) -> list[str]:
        got: list[str] = []
        start.wait(10)
        while True:
            with db.write() as s:
                batch = [j.id for j in claim_queued(s, 3, f"w{worker}")]
            if not batch:
                return got
            got.extend(batch)

    with ThreadPoolExecutor(8) as pool:
        claimed = [job_id for batch in pool.map(claimer, range(8)) for job_id in batch]
    assert len(claimed) == len(set(claimed)) == 40 and set(claimed) == ids
    with db.read() as s:
        assert count_jobs(s, status="running") == 40
        assert all(j.attempt == 1 for j in list_jobs(s, limit=100).data)


def test_pagination_returns_every_job_once_while_jobs_are_created(db: Database) -> None:
    existing = [new_job(db) for _ in range(30)]
    stop = threading.Event()
    created_during: list[str] = []

    def writer() -> None:
        while not stop.is_set():
            created_during.append(new_job(db, spec=spec("late")))

    thread = threading.Thread(target=writer)
    thread.start()
    seen: list[str] = []
    seqs: list[int] = []
    try:
        cursor = None
        while True:
            with db.read() as s:
                page = list_jobs(s, limit=4, after=cursor)
            seen.extend(j.id for j in page.data)
            seqs.extend(j.seq for j in page.data)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
    finally:
        stop.set()
        thread.join()
    assert created_during, "the writer should have created jobs during the walk"
    assert len(seen) == len(set(seen)), "a job appeared twice"
    assert set(existing) <= set(seen), "a job that existed before the walk was missed"
    assert seqs == sorted(seqs, reverse=True), "pages are newest first"


def test_list_filters_and_bad_cursor(db: Database) -> None:
    a, b = new_job(db), new_job(db, group_id="sweep-1")
    with db.write() as s:
        transition(s, a, "running")
    with db.read() as s:
        assert [j.id for j in list_jobs(s, status="running").data] == [a]
        assert [j.id for j in list_jobs(s, status=["queued", "running"]).data] == [b, a]
        assert [j.id for j in list_jobs(s, group_id="sweep-1").data] == [b]
        page = list_jobs(s, limit=1)
        assert [j.id for j in page.data] == [b] and page.next_cursor
        assert [j.id for j in list_jobs(s, limit=1, after=page.next_cursor).data] == [a]
        for bad in ("nope", "", "ajE6eA"):
            with pytest.raises(InvalidCursorError):
                list_jobs(s, after=bad)
        with pytest.raises(ValueError):
            list_jobs(s, status="paused")


def test_progress_submission_and_key_purge(db: Database) -> None:
    job_id = new_job(db, idempotency_key="old")
    with db.write() as s:
        transition(s, job_id, "running")
        assert update_progress(s, job_id, step=7, total_steps=100)
        assert set_ray_submission(s, job_id, job_id)
    with db.read() as s:
        job = require_job(s, job_id)
        assert (job.step, job.total_steps, job.ray_submission_id) == (7, 100, job_id)
        assert job.heartbeat_at is not None
    with db.write() as s:
        transition(s, job_id, "succeeded")
        assert not update_progress(s, job_id, step=8)
        assert purge_idempotency_keys(s, utcnow() - timedelta(hours=1)) == 0
        assert purge_idempotency_keys(s, utcnow() + timedelta(seconds=1)) == 1
    with db.write() as s:  # the key is free again: a new job
        job, created = create_job(s, project="p", spec=spec(), idempotency_key="old")
    assert created and job.id != job_id
