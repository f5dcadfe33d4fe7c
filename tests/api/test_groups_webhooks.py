"""Groups (`spec.group`, `GET /v1/jobs?group=`) and the webhook parts of the API: host policy, secret route."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient

from api.main import create_app
from core.settings import Settings
from core.webhooks import project_secret
from tests.api.conftest import auth


def test_group_is_stored_shown_and_filters_the_list(client: TestClient, spec: dict[str, Any]) -> None:
    ids = {}
    for group in ("sweep-a", "sweep-a", "sweep-b", None):
        r = client.post("/v1/jobs", json={**spec, "group": group}, headers=auth())
        assert r.status_code == 201, r.text
        assert r.json()["group"] == group
        ids.setdefault(group, []).append(r.json()["id"])
    page = client.get("/v1/jobs", params={"group": "sweep-a"}, headers=auth()).json()
    assert sorted(j["id"] for j in page["data"]) == sorted(ids["sweep-a"])
    assert client.get("/v1/jobs", params={"group": "sweep-a"}, headers=auth("team-b")).json()["data"] == []
    assert len(client.get("/v1/jobs", headers=auth()).json()["data"]) == 4


def test_a_bad_group_name_is_a_field_error(client: TestClient, spec: dict[str, Any]) -> None:
    r = client.post("/v1/jobs", json={**spec, "group": "no spaces/slashes"}, headers=auth())
    assert r.status_code == 422
    assert any(e["loc"] == "group" for e in r.json()["errors"])


def test_webhooks_are_validated(client: TestClient, spec: dict[str, Any]) -> None:
    ok = client.post(
        "/v1/jobs", json={**spec, "webhooks": [{"url": "https://ci.example.com/hook"}]}, headers=auth()
    )
    assert ok.status_code == 201, ok.text
    assert ok.json()["spec"]["webhooks"][0]["events"] == [
        "job.started",
        "job.succeeded",
        "job.failed",
        "job.cancelled",
        "job.checkpoint",
    ]
    bad = client.post(
        "/v1/jobs",
        json={**spec, "webhooks": [{"url": "ftp://x", "events": ["job.exploded"]}]},
        headers=auth(),
    )
    assert bad.status_code == 422
    locs = {e["loc"] for e in bad.json()["errors"]}
    assert {"webhooks.0.url", "webhooks.0.events.0"} <= locs


def test_duplicate_and_unparsable_webhook_urls_are_field_errors(
    client: TestClient, spec: dict[str, Any]
) -> None:
    twice = [{"url": "https://a.example/h", "events": ["job.started"]}, {"url": "https://a.example/h"}]
    r = client.post("/v1/jobs", json={**spec, "webhooks": twice}, headers=auth())
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == "webhooks"
    broken = client.post("/v1/jobs", json={**spec, "webhooks": [{"url": "http://[::1/x"}]}, headers=auth())
    assert broken.status_code == 422, broken.text
    assert broken.json()["errors"][0]["loc"] == "webhooks.0.url"


def test_webhook_hosts_outside_the_allow_list_are_refused(
    make_settings: Callable[..., Settings], spec: dict[str, Any]
) -> None:
    app = create_app(make_settings(webhook_allowed_hosts="*.example.com, hooks.internal"))
    with TestClient(app) as client:
        refused = client.post(
            "/v1/jobs", json={**spec, "webhooks": [{"url": "http://169.254.169.254/latest"}]}, headers=auth()
        )
        assert refused.status_code == 422
        assert refused.json()["errors"][0]["loc"] == "webhooks.0.url"
        assert "169.254.169.254" in refused.json()["detail"]
        allowed = client.post(
            "/v1/jobs", json={**spec, "webhooks": [{"url": "https://ci.example.com/h"}]}, headers=auth()
        )
        assert allowed.status_code == 201, allowed.text


def test_webhook_secret_is_per_project_and_needs_a_token(client: TestClient, settings: Settings) -> None:
    a = client.get("/v1/webhooks/secret", headers=auth("team-a")).json()
    b = client.get("/v1/webhooks/secret", headers=auth("team-b")).json()
    assert a["project"] == "team-a" and a["secret"].startswith("whsec_") and a["secret"] != b["secret"]
    assert a["secret"] == project_secret(settings.webhook_master_secret(), "team-a")
    assert client.get("/v1/webhooks/secret").status_code == 401
