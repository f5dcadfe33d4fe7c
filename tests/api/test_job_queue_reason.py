"""A queued job says why it waits (its project's quota, the cluster's capacity) in the job resource; and
`spec.priority` is accepted, bounded and stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from core.scheduling import ProjectQuota
from core.settings import Settings
from tests.api.conftest import auth
from tests.workers.test_dispatcher import RecordingRayJobs
from workers.dispatcher import Dispatcher, DriverEnv


def post(client: TestClient, spec: dict[str, Any], project: str = "team-a", **extra: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={**spec, **extra}, headers=auth(project))
    assert response.status_code == 201, response.text
    return response.json()


def dispatch_once(
    client: TestClient, settings: Settings, tmp_path: Path, cpus: float = 16.0
) -> RecordingRayJobs:
    ray_jobs = RecordingRayJobs()
    Dispatcher(
        client.app.state.db,  # type: ignore[attr-defined]
        ray_jobs,  # type: ignore[arg-type]
        capacity=lambda: {"CPU": cpus, "GPU": 0.0},
        max_concurrent=8,
        driver_env=DriverEnv("sqlite://", tmp_path / "artifacts", False),
        quotas=settings.project_quotas,
    )._dispatch()
    return ray_jobs


def test_a_job_waiting_for_its_projects_quota_says_so(make_settings, spec, tmp_path: Path) -> None:
    from api.main import create_app

    settings = make_settings(project_quotas='{"team-a": {"max_jobs": 1}}')
    assert settings.project_quotas == {"team-a": ProjectQuota(max_jobs=1)}
    app = create_app(settings)
    try:
        with TestClient(app) as client:
            first, second = post(client, spec), post(client, spec)
            assert second["queue_reason"] is None  # not looked at by a dispatcher yet
            other = post(client, spec, project="team-b")
            ray_jobs = dispatch_once(client, settings, tmp_path)
            assert set(ray_jobs.submitted) == {first["id"], other["id"]}

            waiting = client.get(f"/v1/jobs/{second['id']}", headers=auth()).json()
            assert waiting["status"] == "queued"
            assert waiting["queue_reason"] == "project_quota: 1 of 1 jobs of project team-a running"
            running = client.get(f"/v1/jobs/{first['id']}", headers=auth()).json()
            assert running["status"] == "running" and running["queue_reason"] is None
            listed = client.get("/v1/jobs?status=queued", headers=auth()).json()["data"]
            assert [(j["id"], j["queue_reason"]) for j in listed] == [(second["id"], waiting["queue_reason"])]
    finally:
        app.state.db.dispose()


def test_a_job_waiting_for_cpus_says_how_many_it_needs(client: TestClient, settings, spec, tmp_path) -> None:
    big = post(client, {**spec, "resources": {"num_workers": 4, "cpus_per_worker": 1}})
    dispatch_once(client, settings, tmp_path, cpus=4.0)
    late = post(client, {**spec, "resources": {"num_workers": 4, "cpus_per_worker": 1}})
    dispatch_once(client, settings, tmp_path, cpus=4.0)  # the first still runs: no CPUs free
    body = client.get(f"/v1/jobs/{late['id']}", headers=auth()).json()
    assert body["queue_reason"] == "capacity: waiting for 4 free CPUs (0 free now)"
    assert client.get(f"/v1/jobs/{big['id']}", headers=auth()).json()["status"] == "running"


def test_priority_is_stored_with_the_spec_and_bounded(client: TestClient, spec) -> None:
    assert post(client, spec, priority=7)["spec"]["priority"] == 7
    assert post(client, spec)["spec"]["priority"] == 0
    for bad in (101, -101, "high", 1.5):
        response = client.post("/v1/jobs", json={**spec, "priority": bad}, headers=auth())
        assert response.status_code == 422, (bad, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert "priority" in response.text
