"""The dispatcher's queue queries on SQLite and PostgreSQL: why a queued job waits, claiming the job the
scheduler picked, and the ends of the queue."""

from __future__ import annotations

from core.store import (
    Database,
    claim_queued,
    create_job,
    get_job,
    queued_span,
    read_job_row,
    set_queue_reasons,
    transition,
)


def new_job(db: Database, project: str = "p") -> str:
    with db.write() as s:
        job, _ = create_job(s, project=project, spec={"name": "q", "model": "m", "dataset": {"train": "d"}})
        return job.id


def reason_of(db: Database, job_id: str) -> str | None:
    with db.read() as s:
        job = get_job(s, job_id)
        assert job is not None
        return job.queue_reason


def test_reasons_are_stored_for_queued_jobs_only_and_cleared_when_claimed(db: Database) -> None:
    waiting, ended = new_job(db), new_job(db)
    with db.write() as s:
        transition(s, ended, "cancelled")
        set_queue_reasons(
            s, {waiting: "project_quota: 1 of 1 jobs of project p running", ended: "capacity: x"}
        )
    assert reason_of(db, waiting) == "project_quota: 1 of 1 jobs of project p running"
    assert reason_of(db, ended) is None  # no longer queued: left alone
    found = read_job_row(db, waiting)
    assert found is not None and found.row.queue_reason == "project_quota: 1 of 1 jobs of project p running"
    with db.write() as s:
        set_queue_reasons(s, {waiting: "capacity: waiting for 2 free CPUs (0 free now)"})
    assert reason_of(db, waiting) == "capacity: waiting for 2 free CPUs (0 free now)"
    with db.write() as s:
        claimed = claim_queued(s, 1, "w1", job_ids=[waiting])
    assert [j.id for j in claimed] == [waiting]
    assert reason_of(db, waiting) is None


def test_claim_takes_the_job_the_scheduler_picked_not_the_oldest(db: Database) -> None:
    oldest, picked = new_job(db), new_job(db)
    with db.write() as s:
        claimed = claim_queued(s, 1, "w1", max_running=1, job_ids=[picked])
    assert [j.id for j in claimed] == [picked]
    with db.write() as s:  # the limit counts every running job, whichever was picked
        assert claim_queued(s, 1, "w1", max_running=1, job_ids=[oldest]) == []
        assert claim_queued(s, 1, "w1", job_ids=[picked]) == []  # not queued any more
    with db.read() as s:
        job = get_job(s, oldest)
        assert job is not None and job.status == "queued"


def test_queued_span_follows_the_oldest_and_newest_queued_job(db: Database) -> None:
    with db.read() as s:
        assert queued_span(s) == (None, None)
    first, second = new_job(db), new_job(db)
    with db.read() as s:
        one, two = get_job(s, first), get_job(s, second)
        assert one is not None and two is not None
        assert queued_span(s) == (one.seq, two.seq)
    with db.write() as s:
        transition(s, first, "cancelled")
    with db.read() as s:
        assert queued_span(s) == (two.seq, two.seq)
