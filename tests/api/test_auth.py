"""Auth and projects: every route needs a token, projects are isolated, the admin sees all, tokens never logged."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import Route

from api.logging import JsonFormatter
from api.main import create_app
from api.services.auth import StartupError
from core.settings import Settings
from tests.api.conftest import TOKENS, auth

PUBLIC = {"/healthz", "/readyz"}


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Everything logged while the test runs, formatted as the server formats it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", path)


def _routes(app: FastAPI) -> list[Any]:
    """Every route with its full path (FastAPI >= 0.16x wraps included routers)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is already flat
        return [r for r in app.routes if isinstance(r, Route)]
    return list(iter_route_contexts(app.routes))


def test_every_route_but_health_needs_a_valid_token(app: FastAPI, client: TestClient) -> None:
    # Only exact pages registered in app.state.public_paths (health, and e.g. a dashboard shell page
    # whose data comes from the API with a token) may answer without one; never an API or metrics path.
    public = set(app.state.public_paths)
    assert public >= PUBLIC
    assert not [p for p in public if p.startswith(("/v1", "/metrics", "/openapi", "/docs"))], public
    routes = _routes(app)
    assert len(routes) >= 12
    checked = 0
    for route in routes:
        for method in sorted(route.methods or {"GET"}):
            if method == "HEAD" or route.path in public - PUBLIC:
                continue
            path = _concrete(route.path)
            for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic abc"}):
                r = client.request(method, path, headers=headers)
                if route.path in PUBLIC:
                    assert r.status_code == 200, (method, path, r.status_code)
                    continue
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers["content-type"] == "application/problem+json"
                assert r.headers["www-authenticate"].startswith("Bearer")
                checked += 1
    assert checked >= 30
    # Unknown paths do not reveal whether they exist without a token.
    assert client.get("/v1/nothing-here").status_code == 401


def test_bad_token_gets_invalid_token_challenge(client: TestClient) -> None:
    r = client.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    assert r.json()["detail"] == "The bearer token is not valid"
    assert client.get("/v1/jobs", headers=auth("team-a")).status_code == 200


def test_projects_are_isolated_and_admin_sees_all(client: TestClient, spec: dict[str, Any]) -> None:
    a = client.post("/v1/jobs", json=spec, headers=auth("team-a")).json()["id"]
    b = client.post("/v1/jobs", json={**spec, "name": "b"}, headers=auth("team-b")).json()["id"]
    for path in (
        f"/v1/jobs/{a}",
        f"/v1/jobs/{a}/metrics",
        f"/v1/jobs/{a}/checkpoints",
        f"/v1/jobs/{a}/generations",
    ):
        r = client.get(path, headers=auth("team-b"))
        assert r.status_code == 404, path
    assert client.post(f"/v1/jobs/{a}/cancel", headers=auth("team-b")).status_code == 404
    assert client.get(f"/v1/jobs/{a}", headers=auth("team-a")).json()["status"] == "queued"
    assert [j["id"] for j in client.get("/v1/jobs", headers=auth("team-b")).json()["data"]] == [b]
    admin = client.get("/v1/jobs", headers=auth("*")).json()["data"]
    assert {j["id"] for j in admin} == {a, b}
    assert client.get(f"/v1/jobs/{a}", headers=auth("*")).json()["project"] == "team-a"
    assert client.post(f"/v1/jobs/{b}/cancel", headers=auth("*")).json()["status"] == "cancelled"


def test_tokens_never_appear_in_logs(
    client: TestClient, spec: dict[str, Any], log_stream: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for project in TOKENS:
        client.post("/v1/jobs", json=spec, headers=auth(project))
        client.get("/v1/jobs", headers=auth(project))
        client.get("/v1/jobs/job_missing", headers=auth(project))
        client.post("/v1/jobs", json={"bad": True}, headers=auth(project))
    client.get("/v1/jobs", headers={"Authorization": "Bearer guessed-secret-value"})
    logging.getLogger("somewhere").warning("oops, header was Bearer %s", TOKENS["team-a"])
    text = log_stream.getvalue() + caplog.text
    assert "api.access" in text
    for token in [*TOKENS.values(), "guessed-secret-value"]:
        assert token not in log_stream.getvalue(), token
    for line in log_stream.getvalue().splitlines():
        record = json.loads(line)
        assert {"ts", "level", "logger", "msg", "request_id"} <= set(record)


def test_access_log_fields_and_request_id(client: TestClient, log_stream: io.StringIO) -> None:
    r = client.get("/v1/jobs", headers={**auth(), "X-Request-ID": "req-abc.123"})
    assert r.headers["x-request-id"] == "req-abc.123"
    generated = client.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert (
        client.get("/healthz", headers={"X-Request-ID": "bad id\twith tabs"}).headers["x-request-id"]
        != "bad id"
    )
    lines = [json.loads(x) for x in log_stream.getvalue().splitlines()]
    access = [x for x in lines if x["logger"] == "api.access" and x["request_id"] == "req-abc.123"]
    assert len(access) == 1
    assert access[0]["method"] == "GET" and access[0]["path"] == "/v1/jobs" and access[0]["status"] == 200
    assert isinstance(access[0]["duration_ms"], float)


def test_open_mode_on_loopback_warns_and_needs_no_token(
    make_settings: Callable[..., Settings], spec: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    app = create_app(make_settings(api_tokens=None))
    assert "no API tokens configured" in caplog.text
    with TestClient(app) as client:
        r = client.post("/v1/jobs", json=spec)
        assert r.status_code == 201 and r.json()["project"] == "default"
        assert client.get("/v1/jobs").json()["data"][0]["id"] == r.json()["id"]
    app.state.db.dispose()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::"])
def test_open_mode_off_loopback_is_refused(make_settings: Callable[..., Settings], host: str) -> None:
    with pytest.raises(StartupError, match="without API tokens"):
        create_app(make_settings(api_tokens=None, host=host))


def test_tokens_file_and_bad_entries(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# team tokens\nteam-c:tok-c-5b1f0a93\n\n*:tok-root-44e1\n", encoding="utf-8")
    app = create_app(make_settings(api_tokens=None, api_tokens_file=tokens, host="0.0.0.0"))
    with TestClient(app) as client:
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer tok-c-5b1f0a93"}).status_code == 200
        # Tokens from the earlier settings were revoked by the sync.
        assert client.get("/v1/jobs", headers=auth("team-a")).status_code == 401
    app.state.db.dispose()
    with pytest.raises(StartupError) as err:
        create_app(make_settings(api_tokens="team-a-missing-colon-secretvalue"))
    assert "secretvalue" not in str(err.value)
    with pytest.raises(StartupError, match="cannot read"):
        create_app(make_settings(api_tokens=None, api_tokens_file=tmp_path / "missing.txt"))


def test_app_refuses_an_unmigrated_database(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(StartupError, match="minordpo db upgrade"):
        create_app(make_settings(database_url=url))
    app = create_app(make_settings(database_url=url, auto_migrate=True))
    with TestClient(app) as client:
        assert client.get("/v1/jobs", headers=auth()).status_code == 200
    app.state.db.dispose()
