"""HTTP plumbing: problem+json everywhere, body limits, health/readiness, Prometheus, OpenAPI and offline docs."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.api.conftest import auth

PROBLEM = "application/problem+json"


def test_unknown_route_and_wrong_method(client: TestClient) -> None:
    r = client.get("/v1/nowhere", headers=auth())
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM
    assert r.json()["detail"] == "No route for /v1/nowhere" and r.json()["instance"] == "/v1/nowhere"
    for method, path in (
        ("DELETE", "/v1/jobs"),
        ("PUT", "/v1/jobs/x"),
        ("GET", "/v1/jobs/x/cancel"),
        ("POST", "/healthz"),
    ):
        r = client.request(method, path, headers=auth())
        assert r.status_code == 405, (method, path)
        assert r.headers["content-type"] == PROBLEM and method in r.json()["detail"]
        assert {"type", "title", "status", "detail", "instance"} <= set(r.json())


def test_json_body_over_the_limit_is_413(make_settings: Any, spec: dict[str, Any]) -> None:
    app = create_app(make_settings(max_request_bytes=2000))
    with TestClient(app) as client:
        r = client.post("/v1/jobs", json={**spec, "name": "x" * 3000}, headers=auth())
        assert r.status_code == 413 and r.headers["content-type"] == PROBLEM
        assert "2000 bytes" in r.json()["detail"]

        def chunks() -> Iterator[bytes]:
            yield b'{"name": "'
            for _ in range(50):
                yield b"y" * 100

        r = client.post("/v1/jobs", content=chunks(), headers={**auth(), "Content-Type": "application/json"})
        assert r.status_code == 413
        assert client.post("/v1/jobs", json=spec, headers=auth()).status_code == 201
    app.state.db.dispose()


def test_health_readiness_and_failing_readiness(client: TestClient, app: Any) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok"}

    def ray_down() -> None:
        raise ConnectionError("no Ray head")

    app.state.readiness_checks["ray"] = ray_down
    r = client.get("/readyz")
    assert r.status_code == 503 and r.headers["content-type"] == PROBLEM
    assert r.json()["checks"] == {"database": "ok", "ray": "error: ConnectionError"}
    assert "ray" in r.json()["detail"]


def test_readiness_fails_when_the_database_is_gone(make_settings: Any, tmp_path: Any) -> None:
    app = create_app(make_settings())
    app.state.db.engine.dispose()
    app.state.readiness_checks["database"] = lambda: (_ for _ in ()).throw(OSError("disk gone"))
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
    app.state.db.dispose()


def test_prometheus_metrics(client: TestClient, spec: dict[str, Any]) -> None:
    job = client.post("/v1/jobs", json=spec, headers=auth()).json()["id"]
    client.post("/v1/jobs", json={**spec, "name": "second"}, headers=auth())
    client.post(f"/v1/jobs/{job}/cancel", headers=auth())
    client.get(f"/v1/jobs/{job}", headers=auth())
    client.get("/v1/jobs/job_missing", headers=auth())
    r = client.get("/metrics", headers=auth())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'minordpo_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"} 1.0' in text
    assert 'minordpo_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0' in text
    assert 'minordpo_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/v1/jobs"}' in text
    assert 'minordpo_jobs{status="queued"} 1.0' in text and 'minordpo_jobs{status="cancelled"} 1.0' in text
    assert "job_missing" not in text  # label values are route templates, never raw paths


def test_openapi_has_routes_examples_and_security(client: TestClient) -> None:
    doc = client.get("/openapi.json", headers=auth()).json()
    paths = doc["paths"]
    for path in ("/v1/jobs", "/v1/jobs:validate", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
                 "/v1/jobs/{job_id}/metrics", "/v1/jobs/{job_id}/checkpoints", "/v1/jobs/{job_id}/generations", "/v1/datasets",
                 "/v1/datasets/{dataset_id}", "/healthz", "/readyz"):  # fmt: skip
        assert path in paths, path
    assert doc["components"]["schemas"]["JobSpec"]["examples"][0]["name"] == "hh-minordpo"
    assert "HTTPBearer" in doc["components"]["securitySchemes"]
    create = paths["/v1/jobs"]["post"]
    assert {"201", "409", "422"} <= set(create["responses"])
    assert any(p["name"] == "Idempotency-Key" for p in create["parameters"])
    assert "multipart/form-data" in paths["/v1/datasets"]["post"]["requestBody"]["content"]


def test_docs_work_offline(client: TestClient) -> None:
    html = client.get("/docs", headers=auth()).text
    assert "/docs/assets/swagger-ui-bundle.js" in html and "/openapi.json" in html
    assert not re.search(r"(src|href)=\"https?://", html), "docs must not load assets from the network"
    js = client.get("/docs/assets/swagger-ui-bundle.js", headers=auth())
    assert js.status_code == 200 and len(js.content) > 100_000
    assert client.get("/docs/assets/swagger-ui.css", headers=auth()).status_code == 200
    assert "Apache License" in client.get("/docs/assets/LICENSE.txt", headers=auth()).text
    assert client.get("/docs/assets/..%2Fmain.py", headers=auth()).status_code == 404


@pytest.fixture
def public_docs_client(make_settings: Any) -> Iterator[TestClient]:
    app = create_app(make_settings(public_docs=True))
    with TestClient(app) as client:
        yield client
    app.state.db.dispose()


def test_public_docs_setting(public_docs_client: TestClient) -> None:
    assert public_docs_client.get("/docs").status_code == 200
    assert public_docs_client.get("/openapi.json").status_code == 200
    assert public_docs_client.get("/docs/assets/swagger-ui.css").status_code == 200
    assert public_docs_client.get("/v1/jobs").status_code == 401
    assert public_docs_client.get("/metrics").status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"null",
        b"[]",
        b'"spec"',
        b'{"name": NaN}',
        b'{"name": "a", "model": {"path": 5}, "dataset": "x"}',
        b'{"name": "a", "model": "' + b"x" * 5000 + b'", "dataset": {"train": "y"}}',
        b'{"name": "a", "model": "m", "dataset": {"train": "' + b"a/" * 3000 + b'"}}',
        b'{"name": "a", "model": "m\\u0000", "dataset": {"train": "d"}}',
        b'{"name": "a", "model": "m", "dataset": {"train": "d", "eval": "e", "eval_fraction": 0.1}}',
        b'{"name": "a", "model": "m", "dataset": {"train": "d"}, "loss": {"type": ["dpo"], "weights": [1, 2]}}',
        b"\xff\xfe",
    ],
)
def test_bad_input_never_500s(client: TestClient, body: bytes) -> None:
    for route in ("/v1/jobs", "/v1/jobs:validate"):
        r = client.post(route, content=body, headers={**auth(), "Content-Type": "application/json"})
        assert r.status_code in (400, 422), (route, r.status_code, r.text[:300])
        assert r.headers["content-type"] == PROBLEM and r.json()["detail"]


def test_unexpected_errors_are_problem_500_with_request_id(app: Any, client: TestClient) -> None:
    @app.get("/v1/boom")
    def boom() -> None:
        raise RuntimeError("kaboom")

    r = client.get("/v1/boom", headers={**auth(), "X-Request-ID": "rid-500"})
    assert r.status_code == 500 and r.headers["content-type"] == PROBLEM
    assert r.headers["x-request-id"] == "rid-500" and "kaboom" not in r.text
