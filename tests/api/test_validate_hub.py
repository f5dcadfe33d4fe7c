"""`POST /v1/jobs:validate` with a model hub id: a bounded wait, no starved request threads, the offline switch."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.settings import Settings
from tests.api.conftest import auth, closed_hub_endpoint

HUB_TIMEOUT_S = 1.5
HUB_LOAD_THREADS = 2


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch, roots: Path) -> Iterator[str]:
    """The hub client pointed at a closed loopback port (as HF_ENDPOINT would), online; yields a hub id."""
    import huggingface_hub.constants as hub
    from transformers import AutoTokenizer  # noqa: F401 - imported before any timing starts

    with closed_hub_endpoint(monkeypatch) as endpoint:
        monkeypatch.setattr(
            hub, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.chdir(roots)  # no local folder of the id's name
        yield f"someorg/somemodel-{uuid.uuid4().hex[:8]}"  # in no cache
    # the hub client's threads still retrying see offline mode again (monkeypatch undone) and end


@pytest.fixture
def hub_client(make_settings: Callable[..., Settings], unreachable_hub: str) -> Iterator[TestClient]:
    settings = make_settings(hub_timeout_s=HUB_TIMEOUT_S, hub_load_threads=HUB_LOAD_THREADS)
    assert not settings.hub_offline
    app = create_app(settings)
    with TestClient(app) as client:
        yield client
    app.state.db.dispose()


def validate(client: TestClient, spec: dict[str, Any], model: str) -> Any:
    return client.post("/v1/jobs:validate", json={**spec, "model": model}, headers=auth())


def test_a_hub_id_answers_422_within_the_deadline_when_the_hub_is_unreachable(
    hub_client: TestClient, spec: dict[str, Any], unreachable_hub: str
) -> None:
    started = time.monotonic()
    r = validate(hub_client, spec, unreachable_hub)
    elapsed = time.monotonic() - started
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
    body = r.json()
    assert [e["loc"] for e in body["errors"]] == ["model.path"] and unreachable_hub in body["detail"]
    assert "within 1.5 s" in body["detail"]
    assert HUB_TIMEOUT_S <= elapsed < HUB_TIMEOUT_S + 3, elapsed


def test_hub_look_ups_leave_the_request_threads_to_other_routes(
    hub_client: TestClient, spec: dict[str, Any], unreachable_hub: str
) -> None:
    burst = 45  # more than the 40 request threads of Starlette's thread pool
    answers: list[Any] = []
    go = threading.Barrier(burst + 1)

    def one(i: int) -> None:
        go.wait(10)
        answers.append(validate(hub_client, spec, f"{unreachable_hub}-{i}"))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(burst)]
    for t in threads:
        t.start()
    go.wait(10)
    time.sleep(0.3)  # the look-ups have started
    started = time.monotonic()
    listed = hub_client.get("/v1/jobs", headers=auth())
    assert listed.status_code == 200 and time.monotonic() - started < 2.0
    for t in threads:
        t.join(HUB_TIMEOUT_S + 10)
    statuses = sorted(r.status_code for r in answers)
    assert len(statuses) == burst and set(statuses) <= {422, 503}, statuses
    assert statuses.count(422) <= HUB_LOAD_THREADS, statuses
    busy = next(r for r in answers if r.status_code == 503)
    assert (
        int(busy.headers["Retry-After"]) >= 1 and busy.headers["content-type"] == "application/problem+json"
    )


@pytest.mark.parametrize("switch", ["MINORDPO_HUB_OFFLINE", "HF_HUB_OFFLINE"])
def test_an_offline_server_answers_a_hub_id_at_once(
    make_settings: Callable[..., Settings],
    spec: dict[str, Any],
    unreachable_hub: str,
    monkeypatch: pytest.MonkeyPatch,
    switch: str,
) -> None:
    monkeypatch.setenv(switch, "1")
    app = create_app(make_settings(hub_timeout_s=30))
    with TestClient(app) as client:
        started = time.monotonic()
        r = validate(client, spec, unreachable_hub)
        elapsed = time.monotonic() - started
    app.state.db.dispose()
    assert r.status_code == 422, r.text
    body = r.json()
    assert [e["loc"] for e in body["errors"]] == ["model.path"]
    assert "server is offline" in body["detail"] and "local folder" in body["detail"]
    assert elapsed < 1.0, elapsed
