"""`hf:OWNER/NAME` datasets through the API: validate and submit from a local mirror, unreachable hub, offline."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.settings import Settings
from tests.api.conftest import PAIRS, auth, closed_hub_endpoint, save_gpt2_tokenizer
from tests.core.test_data_hub import write_hub_repo

HUB_TIMEOUT_S = 1.5


@pytest.fixture
def hub_spec(roots: Path) -> dict[str, Any]:
    save_gpt2_tokenizer(roots / "models" / "gpt2")
    return {
        "name": "hub-job",
        "model": str(roots / "models" / "gpt2"),
        "dataset": {"train": "hf:someorg/prefs"},
        "training": {"max_steps": 5, "batch_size": 2, "max_length": 64},
    }


def make_client(make_settings: Callable[..., Settings], **overrides: Any) -> Iterator[TestClient]:
    app = create_app(make_settings(**overrides))
    with TestClient(app) as client:
        yield client
    app.state.db.dispose()


@pytest.fixture
def mirror(tmp_path: Path) -> Path:
    """A hub mirror with someorg/prefs: 6 train rows (row 2 has a null `rejected`) and 3 test rows."""
    rows = [dict(p) for p in PAIRS[:6]]
    rows[1] = {**rows[1], "rejected": None}
    root = tmp_path / "mirror"
    write_hub_repo(root, "someorg/prefs", rows, rows[3:])
    return root


@pytest.fixture
def mirror_client(make_settings: Callable[..., Settings], mirror: Path) -> Iterator[TestClient]:
    yield from make_client(make_settings, hub_datasets_root=mirror)


def test_validate_loads_a_hub_dataset_with_per_row_errors(
    mirror_client: TestClient, hub_spec: dict[str, Any], tmp_path: Path
) -> None:
    hub_spec["dataset"]["eval"] = "hf:someorg/prefs"
    r = mirror_client.post("/v1/jobs:validate", json=hub_spec, headers=auth())
    assert r.status_code == 200, r.text
    body = r.json()
    report = body["dataset"]
    assert (report["train_rows"], report["eval_rows"], report["rows_skipped"]) == (5, 3, 1)
    assert [(s["line"], s["split"]) for s in report["skipped"]] == [(2, "train")]
    saved = tmp_path / "artifacts" / "hub-datasets" / "saved"
    train, eval_ = body["spec"]["dataset"]["train"], body["spec"]["dataset"]["eval"]
    assert train != eval_ and {Path(train).parent, Path(eval_).parent} == {saved}


def test_a_job_stores_the_saved_folder_for_offline_workers(
    mirror_client: TestClient, hub_spec: dict[str, Any], tmp_path: Path
) -> None:
    r = mirror_client.post("/v1/jobs", json=hub_spec, headers=auth())
    assert r.status_code == 201, r.text
    job = mirror_client.get(f"/v1/jobs/{r.json()['id']}", headers=auth()).json()
    assert Path(job["spec"]["dataset"]["train"]).parent == tmp_path / "artifacts" / "hub-datasets" / "saved"


def test_an_unknown_hub_dataset_is_one_line_naming_the_field(
    mirror_client: TestClient, hub_spec: dict[str, Any]
) -> None:
    hub_spec["dataset"]["train"] = "hf:someorg/missing"
    r = mirror_client.post("/v1/jobs:validate", json=hub_spec, headers=auth())
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
    body = r.json()
    assert [e["loc"] for e in body["errors"]] == ["dataset.train"]
    assert "'someorg/missing' not found" in body["detail"] and "\n" not in body["detail"]


def test_hub_values_are_never_local_paths(
    make_settings: Callable[..., Settings], hub_spec: dict[str, Any], roots: Path
) -> None:
    (roots / "hf:someorg").mkdir()
    (roots / "hf:someorg" / "prefs").write_text("{}\n")  # a local file of that name is not read
    for client in make_client(make_settings, hub_offline=True):
        r = client.post("/v1/jobs:validate", json=hub_spec, headers=auth())
    assert r.status_code == 422 and "hub is offline" in r.json()["detail"]


def test_offline_refuses_at_once(make_settings: Callable[..., Settings], hub_spec: dict[str, Any]) -> None:
    for client in make_client(make_settings, hub_offline=True):
        started = time.monotonic()
        r = client.post("/v1/jobs:validate", json=hub_spec, headers=auth())
        assert time.monotonic() - started < 1.0
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["errors"]] == ["dataset.train"]
    assert "hub is offline" in r.json()["detail"] and "\n" not in r.json()["detail"]


def test_an_unreachable_hub_answers_within_the_deadline(
    make_settings: Callable[..., Settings], hub_spec: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets.config

    with closed_hub_endpoint(monkeypatch) as endpoint:
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
        monkeypatch.setattr(
            datasets.config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"
        )
        hub_spec["dataset"]["train"] = f"hf:someorg/unreachable-{endpoint.rsplit(':', 1)[1]}"
        for client in make_client(make_settings, hub_timeout_s=HUB_TIMEOUT_S):
            started = time.monotonic()
            r = client.post("/v1/jobs:validate", json=hub_spec, headers=auth())
            elapsed = time.monotonic() - started
    assert r.status_code == 422, r.text
    body = r.json()
    assert [e["loc"] for e in body["errors"]] == ["dataset.train"]
    assert "did not answer" in body["detail"] and "within 1.5 s" in body["detail"]
    assert HUB_TIMEOUT_S <= elapsed < HUB_TIMEOUT_S + 3, elapsed
