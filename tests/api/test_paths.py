"""Path policy: traversal, absolute paths outside the roots and symlink escapes are 422s naming the field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.services.paths import looks_like_hub_id
from tests.api.conftest import auth, write_jsonl


def post(client: TestClient, spec: dict[str, Any], route: str = "/v1/jobs") -> Any:
    return client.post(route, json=spec, headers=auth())


def assert_refused(r: Any, field: str, value: str, words: str) -> None:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    locs = [e["loc"] for e in body["errors"]]
    assert field in locs, body
    msg = next(e["msg"] for e in body["errors"] if e["loc"] == field)
    assert f"'{value}'" in msg and words in msg, msg
    assert field in body["detail"]


@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/jobs:validate"])
def test_traversal_out_of_the_root_is_refused(
    client: TestClient, spec: dict[str, Any], roots: Path, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    outside = write_jsonl(roots.parent / "outside.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    monkeypatch.chdir(roots)
    r = post(client, {**spec, "dataset": {"train": "../outside.jsonl"}}, route)
    assert_refused(r, "dataset.train", "../outside.jsonl", "outside the allowed roots")
    r = post(client, {**spec, "dataset": {"train": str(roots / ".." / outside.name)}}, route)
    assert_refused(r, "dataset.train", str(roots / ".." / outside.name), "outside the allowed roots")
    r = post(client, {**spec, "model": "../../../../etc"}, route)
    assert_refused(r, "model.path", "../../../../etc", "outside the allowed roots")


def test_traversal_that_stays_inside_is_fine(
    client: TestClient, spec: dict[str, Any], roots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(roots / "models")
    r = post(client, {**spec, "dataset": {"train": "../train.jsonl"}})
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["dataset"]["train"] == str(roots / "train.jsonl")


def test_absolute_paths_outside_the_roots_are_refused(client: TestClient, spec: dict[str, Any]) -> None:
    r = post(client, {**spec, "model": "/etc"})
    assert_refused(r, "model.path", "/etc", "outside the allowed roots")
    r = post(client, {**spec, "dataset": {"train": "/etc/passwd"}})
    assert_refused(r, "dataset.train", "/etc/passwd", "outside the allowed roots")
    r = post(client, {**spec, "dataset": {"train": spec["dataset"]["train"], "eval": "/etc/hosts"}})
    assert_refused(r, "dataset.eval", "/etc/hosts", "outside the allowed roots")


def test_symlink_escapes_are_refused(
    client: TestClient, spec: dict[str, Any], roots: Path, tmp_path: Path
) -> None:
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    write_jsonl(secret_dir / "data.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    os.symlink(secret_dir / "data.jsonl", roots / "link.jsonl")
    os.symlink(secret_dir, roots / "models" / "linked-model")
    r = post(client, {**spec, "dataset": {"train": str(roots / "link.jsonl")}})
    assert_refused(r, "dataset.train", str(roots / "link.jsonl"), "outside the allowed roots")
    r = post(client, {**spec, "model": str(roots / "models" / "linked-model")})
    assert_refused(r, "model.path", str(roots / "models" / "linked-model"), "outside the allowed roots")
    # A symlink that stays inside the roots is followed and stored resolved.
    os.symlink(roots / "train.jsonl", roots / "inner-link.jsonl")
    r = post(client, {**spec, "dataset": {"train": str(roots / "inner-link.jsonl")}})
    assert r.status_code == 201 and r.json()["spec"]["dataset"]["train"] == str(roots / "train.jsonl")


def test_missing_paths_and_files_as_models_are_refused(
    client: TestClient, spec: dict[str, Any], roots: Path
) -> None:
    r = post(client, {**spec, "dataset": {"train": str(roots / "nope.jsonl")}})
    assert_refused(r, "dataset.train", str(roots / "nope.jsonl"), "does not exist")
    r = post(client, {**spec, "model": str(roots / "train.jsonl")})
    assert_refused(r, "model.path", str(roots / "train.jsonl"), "is not a folder")
    r = post(client, {**spec, "dataset": {"train": "bad\x00name"}})
    assert r.status_code == 422


def test_every_bad_field_is_named_at_once(client: TestClient, spec: dict[str, Any]) -> None:
    r = post(
        client,
        {**spec, "model": {"path": "/etc", "trust_remote_code": True}, "dataset": {"train": "/etc/passwd"}},
    )
    assert r.status_code == 422
    assert {e["loc"] for e in r.json()["errors"]} == {
        "model.path",
        "model.trust_remote_code",
        "dataset.train",
    }


def test_trust_remote_code_is_refused_unless_allowed(
    client: TestClient, spec: dict[str, Any], make_settings: Any
) -> None:
    r = post(client, {**spec, "model": {"path": spec["model"], "trust_remote_code": True}})
    assert r.status_code == 422
    assert r.json()["errors"] == [
        {
            "loc": "model.trust_remote_code",
            "msg": "remote code is disabled on this server (the operator can set MINORDPO_ALLOW_REMOTE_CODE=true)",
        }
    ]
    from api.main import create_app

    app = create_app(make_settings(allow_remote_code=True))
    with TestClient(app) as other:
        r = other.post(
            "/v1/jobs",
            json={**spec, "model": {"path": spec["model"], "trust_remote_code": True}},
            headers=auth(),
        )
        assert r.status_code == 201, r.text
    app.state.db.dispose()


def test_hub_ids_pass_only_when_unambiguous(
    client: TestClient, spec: dict[str, Any], roots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(roots)
    r = post(client, {**spec, "model": "HuggingFaceTB/SmolLM2-135M"})
    assert r.status_code == 201 and r.json()["spec"]["model"]["path"] == "HuggingFaceTB/SmolLM2-135M"
    # A local folder of that name wins, and is then subject to the path policy.
    (roots / "org").mkdir()
    (roots / "org" / "model").mkdir()
    r = post(client, {**spec, "model": "org/model"})
    assert r.status_code == 201 and r.json()["spec"]["model"]["path"] == str(roots / "org" / "model")
    for value in ("./org/name", "../org/name", "/org/name", ".hidden/name", "a/b/c", "org/../name", "~/x"):
        assert not looks_like_hub_id(value), value
    for value in ("gpt2", "org/name", "Org-1/name_2.5"):
        assert looks_like_hub_id(value), value
    # Datasets are never hub ids: an org/name that does not exist is a missing path.
    r = post(client, {**spec, "dataset": {"train": "org/dataset"}})
    assert_refused(r, "dataset.train", "org/dataset", "does not exist")
