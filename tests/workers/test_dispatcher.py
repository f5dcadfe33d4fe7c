"""The dispatcher and the driver it starts, without Ray: a newly queued job picked up between full passes
(a recording fake for Ray), an unreachable database, the driver's settings file and its imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from core.store import Database, cancel_job, create_job, get_job, list_events
from workers.dispatcher import QUEUE_POLL_S, Dispatcher, DriverEnv


class RecordingRayJobs:
    """Stands in for workers.ray_jobs_client.RayJobs: remembers submissions; what it took is RUNNING."""

    def __init__(self) -> None:
        self.submitted: dict[str, float] = {}
        self.status_calls = 0

    def submit(self, submission_id: str, entrypoint: list[str]) -> None:
        self.submitted[submission_id] = time.monotonic()

    def status(self, submission_id: str) -> str | None:
        self.status_calls += 1
        return "RUNNING" if submission_id in self.submitted else None


def spec(workers: int = 2) -> dict:
    return {
        "name": "q",
        "model": "m",
        "dataset": {"train": "d.jsonl"},
        "resources": {"num_workers": workers, "cpus_per_worker": 1},
    }


def queue(db: Database, workers: int = 2) -> str:
    with db.write() as s:
        job, _ = create_job(s, project="p", spec=spec(workers))
        return job.id


def test_a_posted_job_is_submitted_before_the_next_full_pass(db: Database, tmp_path: Path) -> None:
    ray_jobs = RecordingRayJobs()
    dispatcher = Dispatcher(
        db,
        ray_jobs,  # type: ignore[arg-type]
        capacity=lambda: {"CPU": 2.0, "GPU": 0.0},
        max_concurrent=2,
        driver_env=DriverEnv("sqlite://", tmp_path / "artifacts", False),
    )
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop, 60.0), daemon=True)
    thread.start()
    try:
        time.sleep(0.5)  # the first full pass is over; the next is a minute away
        first = queue(db)
        queued_at = time.monotonic()
        deadline = queued_at + 5
        while first not in ray_jobs.submitted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first in ray_jobs.submitted, "the job waited for the next full pass"
        assert ray_jobs.submitted[first] - queued_at < 1.0 + 10 * QUEUE_POLL_S

        # a job that must wait for CPUs is looked at once, says so once, and is not claimed
        second = queue(db)
        time.sleep(20 * QUEUE_POLL_S)
        with db.read() as s:
            job = get_job(s, second)
            assert job is not None and job.status == "queued"
            waiting = [e for e in list_events(s, second) if e.kind == "waiting"]
        assert len(waiting) == 1 and "2 free CPUs (0 free now)" in waiting[0].message
        assert second not in ray_jobs.submitted
        assert ray_jobs.status_calls <= 1  # running jobs are reconciled with Ray only on full passes
    finally:
        stop.set()
        thread.join(5)


def test_an_unreachable_database_is_retried_each_pass_not_each_poll(tmp_path: Path, caplog) -> None:
    class Unreachable:
        def read(self):
            raise ConnectionError("database is down")

    dispatcher = Dispatcher(
        Unreachable(),  # type: ignore[arg-type]
        RecordingRayJobs(),  # type: ignore[arg-type]
        capacity=lambda: {"CPU": 2.0, "GPU": 0.0},
        max_concurrent=2,
        driver_env=DriverEnv("sqlite://", tmp_path / "artifacts", False),
    )
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop, 0.5), daemon=True)
    with caplog.at_level("ERROR", logger="workers.dispatcher"):
        thread.start()
        time.sleep(1.2)
        stop.set()
        thread.join(5)
    failures = [r for r in caplog.records if "dispatcher pass failed" in r.getMessage()]
    assert 2 <= len(failures) <= 4  # once per 0.5 s pass, not once per 0.1 s poll


def test_the_driver_imports_no_torch() -> None:
    """The driver is a fresh process per job that no pool can serve: it must stay light (README's claim)."""
    probe = "import sys, workers.entrypoint, workers.job_run; print(sorted(m for m in ('torch', 'transformers', 'ray.train') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_driver_settings_file_is_private_and_complete(tmp_path) -> None:
    env = DriverEnv("postgresql+psycopg://u:secret@db/x", tmp_path / "artifacts", False)
    path = env.write()
    assert path == tmp_path / "artifacts" / "driver-env.json"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert json.loads(path.read_text()) == env.as_env()
    assert [p.name for p in path.parent.iterdir()] == ["driver-env.json"]  # no temporary file left


def gpu_spec(workers: int, gpus: float = 1.0) -> dict:
    return {**spec(workers), "resources": {"num_workers": workers, "use_gpu": True, "gpus_per_worker": gpus}}


def gpu_cluster_dispatcher(
    db: Database, ray_jobs: RecordingRayJobs, tmp_path: Path, gpus: float
) -> Dispatcher:
    """A dispatcher over a cluster of 16 CPUs and `gpus` GPUs."""
    return Dispatcher(
        db,
        ray_jobs,  # type: ignore[arg-type]
        capacity=lambda: {"CPU": 16.0, "GPU": gpus},
        max_concurrent=4,
        driver_env=DriverEnv("sqlite://", tmp_path / "artifacts", False),
    )


def test_a_job_asking_for_more_gpus_than_the_cluster_has_fails_at_once(db: Database, tmp_path: Path) -> None:
    ray_jobs = RecordingRayJobs()
    dispatcher = gpu_cluster_dispatcher(db, ray_jobs, tmp_path, gpus=0.0)
    with db.write() as s:
        job, _ = create_job(s, project="p", spec=gpu_spec(2))
    dispatcher._dispatch()
    with db.read() as s:
        failed = get_job(s, job.id)
        assert failed is not None and failed.status == "failed"
        assert failed.error["code"] == "insufficient_resources"
        assert failed.error["message"] == (
            "the job needs 2 GPUs (resources.num_workers x gpus_per_worker, with use_gpu) "
            "but the cluster has 0 in all"
        )
    assert job.id not in ray_jobs.submitted


def test_a_gpu_job_that_can_fit_waits_for_free_gpus_and_fractions_share_a_gpu(
    db: Database, tmp_path: Path
) -> None:
    ray_jobs = RecordingRayJobs()
    dispatcher = gpu_cluster_dispatcher(db, ray_jobs, tmp_path, gpus=4.0)
    with db.write() as s:
        first, _ = create_job(s, project="p", spec=gpu_spec(3))
        second, _ = create_job(s, project="p", spec=gpu_spec(2, gpus=1.0))
    dispatcher._dispatch()
    assert first.id in ray_jobs.submitted and second.id not in ray_jobs.submitted
    with db.read() as s:
        job = get_job(s, second.id)
        assert job is not None and job.status == "queued"
        waiting = [e.message for e in list_events(s, second.id) if e.kind == "waiting"]
    assert waiting == ["waiting for 2 free GPUs (1 free now)"]
    # half a GPU per worker: two workers fit in the one GPU left
    with db.write() as s:
        cancel_job(s, second.id)
        third, _ = create_job(s, project="p", spec=gpu_spec(2, gpus=0.5))
    dispatcher._dispatch()
    assert third.id in ray_jobs.submitted


def test_the_scaling_config_asks_ray_for_gpus_and_placement() -> None:
    from core.spec import JobSpec

    res = JobSpec.model_validate(
        {
            **spec(2),
            "resources": {
                "num_workers": 2,
                "use_gpu": True,
                "gpus_per_worker": 2,
                "cpus_per_worker": 4,
                "accelerator_type": "H100",
                "placement_strategy": "STRICT_PACK",
            },
        }
    ).resources
    assert res.worker_resources() == {"CPU": 4.0, "GPU": 2.0}
    assert res.needs() == {"CPU": 8.0, "GPU": 4.0}
    cpu_only = JobSpec.model_validate(spec(2)).resources
    assert cpu_only.worker_resources() == {"CPU": 1.0} and cpu_only.needs()["GPU"] == 0.0


def test_the_driver_settings_carry_the_data_limits(tmp_path: Path) -> None:
    from core.settings import Settings

    settings = Settings(artifacts_dir=tmp_path / "artifacts", max_line_bytes=4096, max_json_depth=7)
    env = DriverEnv.from_settings(settings).as_env()
    assert env["MINORDPO_MAX_LINE_BYTES"] == "4096" and env["MINORDPO_MAX_JSON_DEPTH"] == "7"
    read_back = Settings(**{k.removeprefix("MINORDPO_").lower(): v for k, v in env.items()})
    assert read_back.data_limits() == settings.data_limits()
