"""Job routes over HTTP: create, idempotency, list and pages, get, cancel, metrics, checkpoints."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi.testclient import TestClient

from core.schemas import MetricSeries
from core.store import Database, add_checkpoint, append_metrics, claim_queued, transition
from tests.api.conftest import auth

PROBLEM = "application/problem+json"


def create(client: TestClient, spec: dict[str, Any], project: str = "team-a", **headers: str) -> Any:
    return client.post("/v1/jobs", json=spec, headers={**auth(project), **headers})


def test_create_returns_201_and_a_queued_job(client: TestClient, spec: dict[str, Any]) -> None:
    r = create(client, spec)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["id"].startswith("job_") and job["status"] == "queued" and job["project"] == "team-a"
    assert job["name"] == "unit-job"
    assert job["progress"] == {"step": 0, "total_steps": None}
    assert job["queue_position"] == 1 and job["error"] is None
    assert job["spec"]["model"]["path"] == spec["model"] and job["spec"]["loss"]["type"] == "minor_dpo"
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"


def test_relative_paths_are_stored_resolved(
    client: TestClient, spec: dict[str, Any], roots, monkeypatch
) -> None:
    monkeypatch.chdir(roots)
    r = create(client, {**spec, "model": "models/empty", "dataset": {"train": "./train.jsonl"}})
    assert r.status_code == 201, r.text
    stored = r.json()["spec"]
    assert stored["model"]["path"] == str(roots / "models" / "empty")
    assert stored["dataset"]["train"] == str(roots / "train.jsonl")


def test_invalid_spec_is_422_with_field_paths(client: TestClient, spec: dict[str, Any]) -> None:
    r = create(client, {**spec, "loss": {"beta": -1}, "bogus": 1})
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    body = r.json()
    locs = {e["loc"] for e in body["errors"]}
    assert {"loss.beta", "bogus"} <= locs
    assert "loss.beta" in body["detail"] and body["instance"] == "/v1/jobs"
    r = create(client, {**spec, "loss": {"type": "nope"}})
    assert r.status_code == 422 and "unknown loss 'nope'" in r.json()["errors"][0]["msg"]


def test_malformed_json_is_400_not_500(client: TestClient) -> None:
    r = client.post("/v1/jobs", content=b"{not json", headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 400 and r.headers["content-type"] == PROBLEM
    r = client.post("/v1/jobs", json=[1, 2], headers=auth())
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM


def test_idempotency_same_body_same_job_other_body_409(client: TestClient, spec: dict[str, Any]) -> None:
    first = create(client, spec, **{"Idempotency-Key": "k-1"})
    again = create(client, spec, **{"Idempotency-Key": "k-1"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    conflict = create(client, {**spec, "name": "other"}, **{"Idempotency-Key": "k-1"})
    assert conflict.status_code == 409 and conflict.headers["content-type"] == PROBLEM
    assert "k-1" in conflict.json()["detail"] and first.json()["id"] in conflict.json()["detail"]
    # Keys are per project: team-b may use the same key for its own job.
    other = create(client, spec, project="team-b", **{"Idempotency-Key": "k-1"})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    assert create(client, spec, **{"Idempotency-Key": "x" * 256}).status_code == 422


def test_50_concurrent_creates_with_10_keys_make_10_jobs(client: TestClient, spec: dict[str, Any]) -> None:
    def post(i: int) -> tuple[int, str, str]:
        key = f"key-{i % 10}"
        r = create(client, spec, **{"Idempotency-Key": key})
        return r.status_code, key, r.json().get("id", r.text)

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(post, range(50)))
    assert all(status in (200, 201) for status, _, _ in results), results
    by_key: dict[str, set[str]] = {}
    for _, key, job_id in results:
        by_key.setdefault(key, set()).add(job_id)
    assert all(len(ids) == 1 for ids in by_key.values()), by_key
    assert sum(status == 201 for status, _, _ in results) == 10
    listed = client.get("/v1/jobs?limit=100", headers=auth()).json()["data"]
    assert len(listed) == 10


def test_list_newest_first_with_status_filter_and_bad_params(
    client: TestClient, spec: dict[str, Any]
) -> None:
    ids = [create(client, {**spec, "name": f"job-{i}"}).json()["id"] for i in range(3)]
    page = client.get("/v1/jobs", headers=auth()).json()
    assert [j["id"] for j in page["data"]] == ids[::-1] and page["next_cursor"] is None
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth())
    cancelled = client.get("/v1/jobs?status=cancelled", headers=auth()).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    queued = client.get("/v1/jobs", params={"status": "queued"}, headers=auth()).json()["data"]
    assert [j["queue_position"] for j in queued] == [2, 1]
    for query, loc in (("status=bogus", "status"), ("limit=0", "limit"), ("limit=5000", "limit")):
        r = client.get(f"/v1/jobs?{query}", headers=auth())
        assert r.status_code == 422 and r.json()["errors"][0]["loc"].endswith(loc), r.text
    r = client.get("/v1/jobs?after=garbage", headers=auth())
    assert r.status_code == 400 and "cursor" in r.json()["detail"]


def test_pagination_sees_every_job_once_while_jobs_are_created(
    client: TestClient, spec: dict[str, Any]
) -> None:
    before = {create(client, {**spec, "name": f"old-{i}"}).json()["id"] for i in range(23)}
    stop = threading.Event()

    def keep_creating() -> None:
        i = 0
        while not stop.is_set() and i < 40:
            create(client, {**spec, "name": f"new-{i}"})
            i += 1

    writer = threading.Thread(target=keep_creating)
    writer.start()
    seen: list[str] = []
    try:
        cursor = None
        while True:
            params = {"limit": 4, **({"after": cursor} if cursor else {})}
            page = client.get("/v1/jobs", params=params, headers=auth()).json()
            seen.extend(j["id"] for j in page["data"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
    finally:
        stop.set()
        writer.join()
    assert len(seen) == len(set(seen)), "a job appeared twice"
    assert before <= set(seen), "a job that existed before paging was missed"


def test_get_unknown_job_is_404_problem(client: TestClient) -> None:
    for path in ("/v1/jobs/job_nope", "/v1/jobs/job_nope/metrics", "/v1/jobs/job_nope/checkpoints"):
        r = client.get(path, headers=auth())
        assert r.status_code == 404 and r.headers["content-type"] == PROBLEM
        assert "job_nope" in r.json()["detail"]
    r = client.post("/v1/jobs/job_nope/cancel", headers=auth())
    assert r.status_code == 404


def test_cancel_is_idempotent_and_flags_running_jobs(
    client: TestClient, db: Database, spec: dict[str, Any]
) -> None:
    queued = create(client, spec).json()["id"]
    for _ in range(2):
        r = client.post(f"/v1/jobs/{queued}/cancel", headers=auth())
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
    running = create(client, {**spec, "name": "running"}).json()["id"]
    with db.write() as session:
        assert [j.id for j in claim_queued(session, 1, "test-worker")] == [running]
    for _ in range(2):
        r = client.post(f"/v1/jobs/{running}/cancel", headers=auth())
        assert r.status_code == 200
        assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True
    got = client.get(f"/v1/jobs/{running}", headers=auth()).json()
    assert got["started_at"] is not None and got["queue_position"] is None


def test_failed_job_shows_error(client: TestClient, db: Database, spec: dict[str, Any]) -> None:
    job_id = create(client, spec).json()["id"]
    with db.write() as session:
        transition(
            session, job_id, "failed", error=("bad_dataset", "train.jsonl line 17: missing field 'rejected'")
        )
    job = client.get(f"/v1/jobs/{job_id}", headers=auth()).json()
    assert job["status"] == "failed" and job["finished_at"] is not None
    assert job["error"] == {"code": "bad_dataset", "message": "train.jsonl line 17: missing field 'rejected'"}


def test_metrics_series_filter_page_and_downsample(
    client: TestClient, db: Database, spec: dict[str, Any]
) -> None:
    job_id = create(client, spec).json()["id"]
    rows = [{"step": s, "time": 1000.0 + s, "loss": 1.0 / s, "acc": s / 100} for s in range(1, 101)]
    with db.write() as session:
        append_metrics(session, job_id, rows)
    url = f"/v1/jobs/{job_id}/metrics"
    full = client.get(url, headers=auth()).json()
    assert len(full["data"]) == 100 and full["next_after_step"] == 100
    assert full["data"][0] == {"step": 1, "time": 1001.0, "loss": 1.0, "acc": 0.01}
    tail = client.get(url, params={"after_step": 95, "names": "loss"}, headers=auth()).json()
    assert [r["step"] for r in tail["data"]] == [96, 97, 98, 99, 100]
    assert set(tail["data"][0]) == {"step", "time", "loss"}
    sampled = client.get(url, params={"max_points": 10}, headers=auth()).json()["data"]
    assert len(sampled) == 10 and sampled[0]["step"] == 1 and sampled[-1]["step"] == 100
    paged = client.get(url, params={"limit": 30}, headers=auth()).json()
    assert len(paged["data"]) == 30 and paged["next_after_step"] == 30
    assert client.get(url, params={"max_points": 1}, headers=auth()).status_code == 422
    bad = client.get(url, params={"names": "bad name!"}, headers=auth())
    assert bad.status_code == 422 and bad.headers["content-type"] == PROBLEM
    job = client.get(f"/v1/jobs/{job_id}", headers=auth()).json()
    assert job["progress"]["step"] == 100 and job["metrics"]["loss"] == 0.01


def test_metrics_body_is_the_documented_series_with_every_value_exact(
    client: TestClient, db: Database, spec: dict[str, Any]
) -> None:
    job_id = create(client, spec).json()["id"]
    odd = {"third": 1 / 3, "tiny": 5e-324, "huge": 1.7976931348623157e308, "neg": -0.0, "nan": float("nan")}
    rows = [{"step": 1, "time": 1767268805.123456, **odd}] + [{"step": s, "loss": 2.0} for s in range(2, 41)]
    with db.write() as session:
        append_metrics(session, job_id, rows)
    # the plain read, and a downsampled one (40 gapless steps to 5: the stored row count's shortcut)
    for params, steps in (({}, list(range(1, 41))), ({"max_points": 5}, [1, 10, 20, 30, 40])):
        response = client.get(f"/v1/jobs/{job_id}/metrics", params=params, headers=auth())
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        body = response.json()
        assert MetricSeries.model_validate(body).model_dump(mode="json") == body
        assert [r["step"] for r in body["data"]] == steps and body["next_after_step"] == 40
        first = body["data"][0]
        assert first == {
            "step": 1,
            "time": 1767268805.123456,
            **{k: v for k, v in odd.items() if k != "nan"},
            "nan": None,
        }
        assert math.copysign(1.0, first["neg"]) == -1.0


def test_checkpoints_list(client: TestClient, db: Database, spec: dict[str, Any]) -> None:
    job_id = create(client, spec).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}/checkpoints", headers=auth()).json() == {"data": []}
    with db.write() as session:
        add_checkpoint(session, job_id, 20, "/ckpt/step-20", {"loss": 0.5})
        add_checkpoint(session, job_id, 10, "/ckpt/step-10")
    data = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=auth()).json()["data"]
    assert [(c["step"], c["path"], c["metrics"]) for c in data] == [
        (10, "/ckpt/step-10", None),
        (20, "/ckpt/step-20", {"loss": 0.5}),
    ]
    assert all(c["created_at"] for c in data)
