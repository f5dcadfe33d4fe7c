"""A worker failure, a NaN loss and a bad dataset reach GET /v1/jobs/{id} in one shape: error {code, message}.

The real driver (workers.entrypoint.run) records each run's outcome; the Ray run itself is replaced by
the failed outcome it would return, made by the same functions the fit task and the workers use.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from ray.exceptions import ActorDiedError
from ray.train import WorkerGroupError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

from core.data import DatasetError
from core.failures import JobFailure
from core.settings import Settings
from core.store import Database, claim_queued
from tests.api.conftest import auth
from tests.driver_helpers import run_real_driver
from workers.launch_record import LaunchRecord
from workers.ray_failures import failure_from_ray
from workers.run_outcome import RunOutcome
from workers.train_worker import loop_failure

WORKER_DIED = WorkerGroupError(
    "rank 1 died", {1: WorkerHealthCheckFailedError("health check", ActorDiedError())}
)


def _drive(monkeypatch: pytest.MonkeyPatch, settings: Settings, job_id: str, run_job: Any) -> None:
    """Run the real driver on the test's database with `run_job` in place of the Ray run."""
    run_real_driver(
        monkeypatch,
        job_id,
        run_job,
        database_url=settings.database_url,
        artifacts_dir=str(settings.artifacts_dir),
    )


def _running_job(client: TestClient, db: Database, spec: dict[str, Any]) -> str:
    job_id = client.post("/v1/jobs", json=spec, headers=auth()).json()["id"]
    with db.write() as s:
        assert [j.id for j in claim_queued(s, 1, "worker-1")] == [job_id]
    return job_id


@pytest.mark.parametrize(
    ("failure", "code", "words"),
    [
        (failure_from_ray(WORKER_DIED, retries=1), "worker_lost", "worker rank 1 was lost (1 retries used up)"),
        (loop_failure(DatasetError("line 3 of train.jsonl is not JSON")), "dataset_error", "line 3 of train.jsonl"),
        (JobFailure("non_finite_loss", "loss is nan at step 3"), "non_finite_loss", "loss is nan at step 3"),
    ],
)  # fmt: skip
def test_a_failed_run_reaches_the_api_as_code_and_message(
    client: TestClient,
    db: Database,
    settings: Settings,
    spec: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    failure: JobFailure,
    code: str,
    words: str,
) -> None:
    job_id = _running_job(client, db, spec)

    def failed_run(launch: LaunchRecord, **kw: Any) -> RunOutcome:
        kw["on_event"]("started", "training started", {"total_steps": 5})
        kw["on_metrics"](1, {"loss": 0.7})
        return RunOutcome.failed(failure, last_step=1, total_steps=5)

    _drive(monkeypatch, settings, job_id, failed_run)
    job = client.get(f"/v1/jobs/{job_id}", headers=auth()).json()
    assert job["status"] == "failed"
    assert set(job["error"]) == {"code", "message"} and job["error"]["code"] == code
    assert words in job["error"]["message"] and "Traceback" not in job["error"]["message"]
    status = [
        e
        for e in client.get(
            f"/v1/jobs/{job_id}/events", headers={**auth(), "Accept": "application/json"}
        ).json()["data"]
        if e["kind"] == "status"
    ]
    assert status[-1]["data"]["error"] == job["error"]


def test_a_driver_that_crashes_records_the_same_shape(
    client: TestClient,
    db: Database,
    settings: Settings,
    spec: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = _running_job(client, db, spec)

    def crashing_run(launch: LaunchRecord, **kw: Any) -> RunOutcome:
        raise ConnectionError("the Ray head went away")

    _drive(monkeypatch, settings, job_id, crashing_run)
    job = client.get(f"/v1/jobs/{job_id}", headers=auth()).json()
    assert job["status"] == "failed"
    assert job["error"] == {"code": "driver_error", "message": "ConnectionError: the Ray head went away"}
