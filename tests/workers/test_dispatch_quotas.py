"""The dispatcher under per-project quotas, without Ray: projects take turns, priority orders a project's
jobs, a waiting job stores why it waits, and a job larger than its project's quota fails at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.scheduling import ProjectQuota
from core.store import Database, create_job, get_job, list_events, transition
from tests.workers.test_dispatcher import RecordingRayJobs, spec
from workers.dispatcher import Dispatcher, DriverEnv


def make_dispatcher(
    db: Database,
    ray_jobs: RecordingRayJobs,
    tmp_path: Path,
    quotas: dict[str, ProjectQuota],
    gpus: float = 0.0,
) -> Dispatcher:
    return Dispatcher(
        db,
        ray_jobs,  # type: ignore[arg-type]
        capacity=lambda: {"CPU": 16.0, "GPU": gpus},
        max_concurrent=8,
        driver_env=DriverEnv("sqlite://", tmp_path / "artifacts", False),
        quotas=quotas,
    )


def submit(db: Database, project: str, name: str, **extra: Any) -> str:
    with db.write() as s:
        job, _ = create_job(s, project=project, spec={**spec(1), "name": name, **extra}, name=name)
        return job.id


def finish_running(db: Database, ray_jobs: RecordingRayJobs) -> None:
    """Every submitted job ends (as its driver would record it)."""
    with db.write() as s:
        for job_id in ray_jobs.submitted:
            transition(s, job_id, "succeeded", expected_from="running")


def test_two_projects_with_a_quota_of_one_interleave_and_priority_orders_each_project(
    db: Database, tmp_path: Path
) -> None:
    ray_jobs = RecordingRayJobs()
    dispatcher = make_dispatcher(db, ray_jobs, tmp_path, {"default": ProjectQuota(max_jobs=1)})
    ids = {
        name: submit(db, project, name, priority=priority)
        for project, name, priority in [
            ("a", "a-first", 0),
            ("a", "a-second", 0),
            ("a", "a-urgent", 9),  # submitted last in a, starts first in a
            ("b", "b-first", 0),
            ("b", "b-second", 0),
        ]
    }
    names = {job_id: name for name, job_id in ids.items()}
    order: list[list[str]] = []
    for turn in range(4):
        before = list(ray_jobs.submitted)
        dispatcher._dispatch()
        order.append([names[j] for j in ray_jobs.submitted if j not in before])
        if turn == 0:  # while a-urgent and b-first run, the others say why they wait
            with db.read() as s:
                waiting = get_job(s, ids["a-first"])
                assert waiting is not None and waiting.status == "queued"
                assert waiting.queue_reason == "project_quota: 1 of 1 jobs of project a running"
                events = [e for e in list_events(s, ids["b-second"]) if e.kind == "waiting"]
                assert [e.message for e in events] == ["1 of 1 jobs of project b running"]
                started = get_job(s, ids["a-urgent"])
                assert started is not None and started.status == "running" and started.queue_reason is None
        finish_running(db, ray_jobs)
    assert order == [["a-urgent", "b-first"], ["a-first", "b-second"], ["a-second"], []]


def test_a_project_at_its_quota_does_not_block_another_projects_job(db: Database, tmp_path: Path) -> None:
    ray_jobs = RecordingRayJobs()
    dispatcher = make_dispatcher(db, ray_jobs, tmp_path, {"a": ProjectQuota(max_jobs=1)})
    a_jobs = [submit(db, "a", f"a{i}") for i in range(3)]
    dispatcher._dispatch()
    assert list(ray_jobs.submitted) == [a_jobs[0]]
    late = submit(db, "b", "b0")  # behind two waiting jobs of a in submission order
    dispatcher._dispatch()
    assert late in ray_jobs.submitted and a_jobs[1] not in ray_jobs.submitted


def test_a_job_asking_for_more_than_its_projects_quota_fails_at_once(db: Database, tmp_path: Path) -> None:
    ray_jobs = RecordingRayJobs()
    dispatcher = make_dispatcher(db, ray_jobs, tmp_path, {"a": ProjectQuota(max_gpus=1)}, gpus=4.0)
    gpu_spec = {"resources": {"num_workers": 2, "use_gpu": True, "gpus_per_worker": 1}}
    too_big = submit(db, "a", "too-big", **gpu_spec)
    other_project = submit(db, "b", "fits", **gpu_spec)
    dispatcher._dispatch()
    with db.read() as s:
        failed = get_job(s, too_big)
        assert failed is not None and failed.status == "failed"
        assert failed.error == {
            "code": "quota_exceeded",
            "message": "the job needs 2 GPUs but project a may use 1 at once (MINORDPO_PROJECT_QUOTAS)",
        }
    assert list(ray_jobs.submitted) == [other_project]
