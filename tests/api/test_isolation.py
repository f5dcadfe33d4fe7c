"""Tenant isolation through spec paths: another project's uploads and models, and the service's own files."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.main import create_app
from core.settings import Settings
from core.store import append_event, transition
from tests.api.conftest import PAIRS, auth

ROUTES = ("/v1/jobs", "/v1/jobs:validate")
#: Every spec field that takes a path, and how to put a value there.
PATH_FIELDS = {
    "model.path": lambda spec, value: {**spec, "model": value},
    "dataset.train": lambda spec, value: {**spec, "dataset": {"train": value}},
    "dataset.eval": lambda spec, value: {**spec, "dataset": {**spec["dataset"], "eval": value}},
}


@pytest.fixture
def wide_settings(make_settings: Any, tmp_path: Path) -> Settings:
    """An operator who allows the whole test folder: database, tokens and artifacts all lie under the root."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("team-c:tok-c-5e2a9f0b31\n", encoding="utf-8")
    return make_settings(allowed_paths=str(tmp_path), api_tokens_file=tokens)


@pytest.fixture
def wide_client(wide_settings: Settings) -> Iterator[TestClient]:
    app: FastAPI = create_app(wide_settings)
    with TestClient(app) as client:
        yield client
    app.state.db.dispose()


def refusal(client: TestClient, route: str, spec: dict[str, Any], field: str, project: str = "team-b") -> str:
    """The 422's message for `field`, asserting the answer names that field."""
    r = client.post(route, json=spec, headers=auth(project))
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    messages = {e["loc"]: e["msg"] for e in r.json()["errors"]}
    assert field in messages, r.json()
    return messages[field]


def upload(client: TestClient, project: str) -> dict[str, Any]:
    body = "\n".join(json.dumps(p) for p in PAIRS).encode()
    r = client.post("/v1/datasets", files={"file": ("pairs.jsonl", body)}, headers=auth(project))
    assert r.status_code in (200, 201), r.text
    return r.json()


def finished_job_with_model(client: TestClient, spec: dict[str, Any], settings: Settings) -> tuple[str, Path]:
    """A team-a job that recorded a final model folder under the artifacts dir (as the workers do)."""
    r = client.post("/v1/jobs", json=spec, headers=auth("team-a"))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    final = settings.artifacts_dir / "jobs" / job_id / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}", encoding="utf-8")
    db = client.app.state.db  # type: ignore[attr-defined]
    with db.write() as session:
        append_event(session, job_id, "final_model", "final model saved", {"path": str(final)})
        transition(session, job_id, "running")
        transition(session, job_id, "succeeded")
    return job_id, final


@pytest.mark.parametrize("route", ROUTES)
def test_another_projects_upload_is_not_reachable_by_path_or_id(
    wide_client: TestClient, spec: dict[str, Any], route: str
) -> None:
    stored = upload(wide_client, "team-a")
    db = wide_client.app.state.db  # type: ignore[attr-defined]
    from core.store import get_dataset

    with db.read() as session:
        path = get_dataset(session, stored["id"], project="team-a").path
    assert Path(path).exists()
    for field in ("dataset.train", "dataset.eval"):
        msg = refusal(wide_client, route, PATH_FIELDS[field](spec, path), field)
        assert "not allowed" in msg and "service's own files" in msg, msg
        # Not even its owner names it by path; by id only, and only its owner.
        refusal(wide_client, route, PATH_FIELDS[field](spec, path), field, project="team-a")
        msg = refusal(wide_client, route, PATH_FIELDS[field](spec, stored["id"]), field)
        assert "unknown dataset id" in msg
    r = wide_client.post(
        "/v1/jobs", json={**spec, "dataset": {"train": stored["id"]}}, headers=auth("team-a")
    )
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["dataset"]["train"] == path


@pytest.mark.parametrize("route", ROUTES)
def test_another_projects_final_model_is_not_reachable_by_path_or_job_id(
    wide_client: TestClient, wide_settings: Settings, spec: dict[str, Any], route: str
) -> None:
    job_id, final = finished_job_with_model(wide_client, spec, wide_settings)
    for field in PATH_FIELDS:
        msg = refusal(wide_client, route, PATH_FIELDS[field](spec, str(final)), field)
        assert "not allowed" in msg, msg
    # By job id: the same 404 as for a job that does not exist, whether named as path or from_job.
    for model in (job_id, {"from_job": job_id}, {"from_job": job_id, "step": 1}):
        r = wide_client.post(route, json={**spec, "model": model}, headers=auth("team-b"))
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json", r.text
        assert r.json()["detail"] == f"job '{job_id}' not found"


def test_a_project_trains_on_its_own_final_model_by_job_id(
    wide_client: TestClient, wide_settings: Settings, spec: dict[str, Any]
) -> None:
    job_id, final = finished_job_with_model(wide_client, spec, wide_settings)
    r = wide_client.post("/v1/jobs", json={**spec, "model": job_id}, headers=auth("team-a"))
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["model"]["path"] == str(final.resolve())
    # A job without a final model (this new one) is refused by id, for its owner too.
    other = r.json()["id"]
    msg = refusal(wide_client, "/v1/jobs", {**spec, "model": other}, "model.from_job", project="team-a")
    assert "has not saved a final model (status queued)" in msg


@pytest.mark.parametrize("route", ROUTES)
def test_the_services_own_files_are_never_spec_paths(
    wide_client: TestClient, wide_settings: Settings, spec: dict[str, Any], route: str, tmp_path: Path
) -> None:
    wide_settings.webhook_master_secret()  # generated into the artifacts dir, as a running service does
    owned = {
        "database": tmp_path / "api.db",
        "token file": tmp_path / "tokens.txt",
        "webhook secret": wide_settings.artifacts_dir / "webhook-secret",
    }
    for name, path in owned.items():
        assert path.exists(), name
        for field in PATH_FIELDS:
            msg = refusal(wide_client, route, PATH_FIELDS[field](spec, str(path)), field)
            assert "not allowed" in msg, (name, field, msg)


def test_refusals_do_not_tell_whether_a_path_exists(
    wide_client: TestClient, wide_settings: Settings, spec: dict[str, Any], tmp_path: Path
) -> None:
    stored = upload(wide_client, "team-a")
    datasets = wide_settings.artifacts_dir.resolve() / "datasets"
    existing = next(datasets.glob("*.jsonl"))
    missing = datasets / ("0" * 64 + ".jsonl")
    assert stored["sha256"] in existing.name and not missing.exists()
    for field in PATH_FIELDS:
        a = refusal(wide_client, "/v1/jobs:validate", PATH_FIELDS[field](spec, str(existing)), field)
        b = refusal(wide_client, "/v1/jobs:validate", PATH_FIELDS[field](spec, str(missing)), field)
        assert a.replace(str(existing), "X") == b.replace(str(missing), "X")
        a = refusal(wide_client, "/v1/jobs", PATH_FIELDS[field](spec, "/etc/passwd"), field)
        b = refusal(wide_client, "/v1/jobs", PATH_FIELDS[field](spec, "/etc/no-such-file"), field)
        assert a.replace("/etc/passwd", "X") == b.replace("/etc/no-such-file", "X")


def test_hub_shaped_names_of_service_files_are_refused_whether_or_not_they_exist(
    wide_client: TestClient, wide_settings: Settings, spec: dict[str, Any], tmp_path: Path, monkeypatch: Any
) -> None:
    wide_settings.webhook_master_secret()
    monkeypatch.chdir(tmp_path)
    for value in ("artifacts/webhook-secret", "artifacts/no-such-model"):
        msg = refusal(wide_client, "/v1/jobs", {**spec, "model": value}, "model.path")
        assert "not allowed" in msg, msg


def test_the_default_roots_leave_out_the_artifacts_dir(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings(artifacts_dir=Path("/srv/minordpo-artifacts"), database_url="sqlite:///var/x.db")
    assert settings.allowed_roots() == [tmp_path.resolve()]
    owned = settings.service_owned_paths()
    assert Path("/srv/minordpo-artifacts") in owned
    outside = Settings(ray_state_file=tmp_path / "ray" / "head.json").service_owned_paths()
    assert {tmp_path / "ray" / n for n in ("head.json", "head.log", "ray-auth-token")} <= set(outside)
    assert tmp_path.resolve() / "var" / "x.db" in owned and tmp_path.resolve() / "var" / "x.db-wal" in owned
