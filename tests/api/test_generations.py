"""Eval generations over HTTP: stored by the driver's writer, read per step, bounded, isolated per project."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from core.spec import MAX_GENERATION_STEPS
from core.store import Database, add_generations
from tests.api.conftest import auth
from workers.entrypoint import JobWriter

PROBLEM = "application/problem+json"


def _samples(tag: str, n: int = 2) -> list[dict[str, Any]]:
    return [
        {"index": i, "prompt": f"prompt {i}", "chosen": f" chosen {i}", "completion": f" {tag} {i}"}
        for i in range(n)
    ]


def _job(client: TestClient, spec: dict[str, Any], project: str = "team-a") -> str:
    r = client.post("/v1/jobs", json=spec, headers=auth(project))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_latest_step_by_default_any_step_on_request(
    client: TestClient, db: Database, spec: dict[str, Any]
) -> None:
    job_id = _job(client, spec)
    url = f"/v1/jobs/{job_id}/generations"
    assert client.get(url, headers=auth()).json() == {"steps": [], "step": None, "data": []}
    writer = JobWriter(db, job_id)
    writer.generations(20, _samples("late"))
    writer.generations(10, _samples("early"))
    writer.generations(10, _samples("retried"))  # a step reported again keeps its first samples
    body = client.get(url, headers=auth()).json()
    assert body["steps"] == [10, 20] and body["step"] == 20
    assert [s["completion"] for s in body["data"]] == [" late 0", " late 1"]
    early = client.get(url, params={"step": 10}, headers=auth()).json()
    assert early["step"] == 10 and early["data"] == _samples("early")
    missing = client.get(url, params={"step": 15}, headers=auth())
    assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM
    assert "step 15" in missing.json()["detail"]
    assert client.get(url, params={"step": -1}, headers=auth()).status_code == 422


def test_texts_and_sample_count_are_bounded(client: TestClient, db: Database, spec: dict[str, Any]) -> None:
    job_id = _job(client, spec)
    huge = [{"prompt": "p" * 10_000, "chosen": "c", "completion": "x" * 10_000}] * 40
    with db.write() as session:
        assert add_generations(session, job_id, 5, huge)
    data = client.get(f"/v1/jobs/{job_id}/generations", headers=auth()).json()["data"]
    assert len(data) == 32 and [s["index"] for s in data] == list(range(32))
    assert {len(s["prompt"]) for s in data} == {4000} and {len(s["completion"]) for s in data} == {4000}


def test_a_job_keeps_its_first_and_latest_generation_steps(
    client: TestClient, db: Database, spec: dict[str, Any]
) -> None:
    job_id = _job(client, spec)
    extra = 5
    for step in range(1, MAX_GENERATION_STEPS + extra + 1):
        with db.write() as session:
            assert add_generations(session, job_id, step, _samples(f"s{step}"))
    with db.write() as session:  # a step reported again after its turn has gone is not kept
        assert not add_generations(session, job_id, 3, _samples("late retry"))
    body = client.get(f"/v1/jobs/{job_id}/generations", headers=auth()).json()
    latest = list(range(extra + 2, MAX_GENERATION_STEPS + extra + 1))
    assert body["steps"] == [1, *latest] and len(body["steps"]) == MAX_GENERATION_STEPS
    first = client.get(f"/v1/jobs/{job_id}/generations", params={"step": 1}, headers=auth()).json()
    assert first["data"] == _samples("s1")
    gone = client.get(f"/v1/jobs/{job_id}/generations", params={"step": 2}, headers=auth())
    assert gone.status_code == 404


def test_another_projects_job_is_404(client: TestClient, db: Database, spec: dict[str, Any]) -> None:
    job_id = _job(client, spec, project="team-b")
    JobWriter(db, job_id).generations(1, _samples("b"))
    r = client.get(f"/v1/jobs/{job_id}/generations", headers=auth("team-a"))
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM and job_id in r.json()["detail"]
    assert client.get(f"/v1/jobs/{job_id}/generations", headers=auth("*")).json()["step"] == 1
    assert client.get("/v1/jobs/job_nope/generations", headers=auth()).status_code == 404


def test_eval_generations_without_an_eval_split_is_a_422_naming_the_field(
    client: TestClient, spec: dict[str, Any]
) -> None:
    spec["training"]["eval_generations"] = 4
    r = client.post("/v1/jobs", json=spec, headers=auth())
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    assert any("training.eval_generations" in e["msg"] for e in r.json()["errors"])
    spec["dataset"]["eval_fraction"] = 0.25
    assert client.post("/v1/jobs", json=spec, headers=auth()).status_code == 201
