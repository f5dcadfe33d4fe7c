"""Dataset uploads (multipart and raw, limits, per-line errors, ids in specs) and the validate dry run."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.api.conftest import PAIRS, auth

GOOD = "".join(json.dumps(r) + "\n" for r in PAIRS).encode()


def upload_multipart(
    client: TestClient, data: bytes, name: str = "train.jsonl", project: str = "team-a"
) -> Any:
    return client.post("/v1/datasets", files={"file": (name, io.BytesIO(data))}, headers=auth(project))


def test_multipart_upload_is_content_addressed(client: TestClient, settings: Any) -> None:
    r = upload_multipart(client, GOOD)
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["id"].startswith("ds_") and len(ds["id"]) == 35 and ds["size"] == len(GOOD)
    assert ds["format"] == "standard" and ds["filename"] == "train.jsonl"
    assert ds["report"]["rows_valid"] == len(PAIRS) and ds["report"]["errors"] == []
    stored = Path(settings.artifacts_dir) / "datasets" / f"{ds['sha256']}.jsonl"
    assert stored.read_bytes() == GOOD
    again = upload_multipart(client, GOOD, name="renamed.jsonl")
    assert again.status_code == 200 and again.json()["id"] == ds["id"]
    assert client.get(f"/v1/datasets/{ds['id']}", headers=auth()).json() == ds
    assert not [p for p in stored.parent.iterdir() if p.name.startswith(".upload")]


def test_raw_body_upload_gz_and_sniffing(client: TestClient) -> None:
    r = client.post("/v1/datasets", content=gzip.compress(GOOD), headers=auth())
    assert r.status_code == 201 and r.json()["report"]["rows_valid"] == len(PAIRS), r.text
    array = json.dumps(PAIRS[:3]).encode()
    r = client.post("/v1/datasets?filename=pairs.json", content=array, headers=auth())
    assert r.status_code == 201 and r.json()["report"]["rows_total"] == 3


def test_bad_lines_are_reported_per_line(client: TestClient) -> None:
    data = GOOD + b"{broken json\n" + json.dumps({"prompt": "p", "chosen": "c"}).encode() + b"\n"
    r = upload_multipart(client, data)
    assert r.status_code == 201
    report = r.json()["report"]
    assert report["rows_invalid"] == 2 and report["rows_valid"] == len(PAIRS)
    lines = {e["line"]: e for e in report["errors"]}
    assert set(lines) == {len(PAIRS) + 1, len(PAIRS) + 2}
    assert "invalid JSON" in lines[len(PAIRS) + 1]["msg"] and "rejected" in lines[len(PAIRS) + 2]["msg"]


def test_unusable_uploads_are_422_with_lines(client: TestClient, settings: Any) -> None:
    r = upload_multipart(client, b'not json\n{"a": 1}\n')
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert [e["loc"] for e in body["errors"]] == ["line 1", "line 2"] and "No usable" in body["detail"]
    assert upload_multipart(client, b"").status_code == 422
    assert (
        client.post(
            "/v1/datasets", files={"other": ("x.txt", b"")}, data={"a": "b"}, headers=auth()
        ).status_code
        == 422
    )
    assert upload_multipart(client, b"PAR1garbage", name="x.parquet").status_code == 422
    leftovers = list((Path(settings.artifacts_dir) / "datasets").iterdir())
    assert leftovers == [], leftovers


@pytest.fixture
def small_upload_client(make_settings: Any) -> Iterator[TestClient]:
    app = create_app(make_settings(max_upload_bytes=1000))
    with TestClient(app) as client:
        yield client
    app.state.db.dispose()


def test_upload_over_the_limit_is_413(small_upload_client: TestClient, settings: Any) -> None:
    assert len(GOOD) > 1000
    r = upload_multipart(small_upload_client, GOOD)
    assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
    assert "1000 bytes" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted while streaming
        for i in range(0, len(GOOD), 100):
            yield GOOD[i : i + 100]

    r = small_upload_client.post("/v1/datasets", content=chunks(), headers=auth())
    assert r.status_code == 413
    assert upload_multipart(small_upload_client, GOOD[:600]).status_code == 201
    folder = Path(settings.artifacts_dir) / "datasets"
    assert not [p for p in folder.iterdir() if p.name.startswith(".upload")]


def test_datasets_are_per_project_and_usable_by_id(client: TestClient, spec: dict[str, Any]) -> None:
    ds = upload_multipart(client, GOOD).json()
    assert client.get(f"/v1/datasets/{ds['id']}", headers=auth("team-b")).status_code == 404
    assert client.get(f"/v1/datasets/{ds['id']}", headers=auth("*")).status_code == 200
    assert client.get("/v1/datasets/ds_0000", headers=auth()).status_code == 404
    r = client.post(
        "/v1/jobs", json={**spec, "dataset": {"train": ds["id"], "eval": ds["id"]}}, headers=auth()
    )
    assert r.status_code == 201, r.text
    stored = r.json()["spec"]["dataset"]
    assert stored["train"].endswith(f"{ds['sha256']}.jsonl") and stored["eval"] == stored["train"]
    r = client.post("/v1/jobs", json={**spec, "dataset": {"train": ds["id"]}}, headers=auth("team-b"))
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == "dataset.train"
    assert "unknown dataset id" in r.json()["errors"][0]["msg"]


@pytest.fixture
def validate_client(make_settings: Any, roots: Path, tokenizer_dir: Path) -> Iterator[TestClient]:
    app = create_app(make_settings(allowed_paths=f"{roots}:{tokenizer_dir}"))
    with TestClient(app) as client:
        yield client
    app.state.db.dispose()


def test_validate_reports_rows_lengths_and_truncation(
    validate_client: TestClient, spec: dict[str, Any], roots: Path, tokenizer_dir: Path
) -> None:
    long_pair = {"prompt": "word " * 200, "chosen": " yes", "rejected": " no"}
    data = roots / "mixed.jsonl"
    rows = [json.dumps(r) for r in PAIRS] + [
        "{oops",
        json.dumps({"prompt": "p", "chosen": "c"}),
        json.dumps(long_pair),
    ]
    data.write_text("\n".join(rows) + "\n")
    body = {**spec, "model": str(tokenizer_dir), "dataset": {"train": str(data), "eval_fraction": 0.2}}
    r = validate_client.post("/v1/jobs:validate", json=body, headers=auth())
    assert r.status_code == 200, r.text
    out = r.json()
    report = out["dataset"]
    assert out["valid"] is True and report["format"] == "standard"
    assert report["rows_used"] == len(PAIRS) + 1 and report["rows_skipped"] == 2
    assert [s["line"] for s in report["skipped"]] == [len(PAIRS) + 1, len(PAIRS) + 2]
    assert report["truncated_rows"] == 1 and report["token_lengths"]["prompt"]["max"] >= 200
    assert report["train_rows"] + report["eval_rows"] == report["rows_used"] and report["eval_rows"] > 0
    assert any("truncated" in w for w in out["warnings"]) and any("skipped" in w for w in out["warnings"])
    assert out["spec"]["model"]["path"] == str(tokenizer_dir)
    assert validate_client.get("/v1/jobs", headers=auth()).json()["data"] == []  # nothing queued


def test_validate_failures_name_the_field_and_line(
    validate_client: TestClient, spec: dict[str, Any], roots: Path, tokenizer_dir: Path
) -> None:
    bad = roots / "bad.jsonl"
    bad.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    body = {**spec, "model": str(tokenizer_dir), "dataset": {"train": str(bad), "on_bad_row": "fail"}}
    r = validate_client.post("/v1/jobs:validate", json=body, headers=auth())
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == "dataset.train"
    assert "line 2" in r.json()["detail"] and "rejected" in r.json()["detail"]
    r = validate_client.post(
        "/v1/jobs:validate", json={**spec, "model": str(roots / "models" / "empty")}, headers=auth()
    )
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == "model.path"
    assert "could not load a tokenizer" in r.json()["detail"]
    r = validate_client.post(
        "/v1/jobs:validate", json={**spec, "training": {"max_length": 2}}, headers=auth()
    )
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == "training.max_length"
