"""GET /v1/jobs/{id} answered by the fast path in front of the router: the same answers as the route."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.hot_path import JobReadFastPath
from api.main import create_app
from core.settings import Settings
from core.store import Database, JobError, claim_queued, transition
from tests.api.conftest import auth


@pytest.fixture
def route_only(settings: Settings) -> Iterator[TestClient]:
    """The same app without the fast path: every GET reaches the FastAPI route."""
    app: FastAPI = create_app(settings)
    app.user_middleware = [m for m in app.user_middleware if m.cls is not JobReadFastPath]
    with TestClient(app) as client:
        yield client
    app.state.db.dispose()


def _comparable(response: Any) -> tuple[int, str, bytes]:
    return response.status_code, response.headers["content-type"], response.content


def test_fast_path_answers_exactly_like_the_route(
    client: TestClient, route_only: TestClient, db: Database, spec: dict[str, Any]
) -> None:
    ids = [client.post("/v1/jobs", json=spec, headers=auth()).json()["id"] for _ in range(4)]
    with db.write() as s:
        claimed = [j.id for j in claim_queued(s, 2, "worker-1")]
        transition(s, claimed[0], "failed", error=JobError("nan_loss", "loss became NaN at step 3"))
    cases = [
        *((f"/v1/jobs/{job_id}", auth()) for job_id in ids),  # failed, running, two queued (positions)
        (f"/v1/jobs/{ids[0]}", auth("*")),  # the admin sees every project
        (f"/v1/jobs/{ids[0]}", auth("team-b")),  # another project's job: 404
        ("/v1/jobs/job_nope", auth()),  # 404 naming the id
        ("/v1/jobs/" + "j" * 65, auth()),  # too long for the route: its 422, through the fast path
    ]
    answers = [client.get(path, headers=headers) for path, headers in cases]
    assert [r.status_code for r in answers] == [200, 200, 200, 200, 200, 404, 404, 422]
    assert [r.json()["queue_position"] for r in answers[:4]] == [None, None, 1, 2]
    assert answers[0].json()["error"] == {"code": "nan_loss", "message": "loss became NaN at step 3"}
    for (path, headers), fast in zip(cases, answers, strict=True):
        assert _comparable(fast) == _comparable(route_only.get(path, headers=headers)), path
        assert fast.headers["x-request-id"]


def test_fast_path_keeps_auth_metrics_and_request_ids(client: TestClient, spec: dict[str, Any]) -> None:
    job_id = client.post("/v1/jobs", json=spec, headers=auth()).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}").status_code == 401
    assert client.get(f"/v1/jobs/{job_id}", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = client.get(f"/v1/jobs/{job_id}", headers={**auth(), "X-Request-ID": "trace-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    assert client.head(f"/v1/jobs/{job_id}", headers=auth()).status_code == 405  # as the route: GET only
    text = client.get("/metrics", headers=auth("*")).text
    line = next(
        x
        for x in text.splitlines()
        if x.startswith("minordpo_http_requests_total{")
        and 'route="/v1/jobs/{job_id}"' in x
        and 'status="200"' in x
        and 'method="GET"' in x
    )
    assert float(line.rsplit(" ", 1)[1]) == 1.0


def test_fast_path_keeps_the_body_limit(
    client: TestClient, route_only: TestClient, spec: dict[str, Any]
) -> None:
    job_id = client.post("/v1/jobs", json=spec, headers=auth()).json()["id"]
    huge = {**auth(), "Content-Length": "999999999999"}
    fast, route = (
        client.get(f"/v1/jobs/{job_id}", headers=huge),
        route_only.get(f"/v1/jobs/{job_id}", headers=huge),
    )
    assert fast.status_code == route.status_code == 413
    assert fast.json()["detail"] == route.json()["detail"]


def test_with_opentelemetry_on_the_router_answers(make_settings: Any) -> None:
    app = create_app(make_settings(otel=True))
    try:
        assert all(m.cls is not JobReadFastPath for m in app.user_middleware)
    finally:
        app.state.db.dispose()
    app = create_app(make_settings())
    try:
        assert any(m.cls is JobReadFastPath for m in app.user_middleware)
    finally:
        app.state.db.dispose()
