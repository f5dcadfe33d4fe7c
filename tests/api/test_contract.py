"""The OpenAPI document is the contract: bounded integers, strict types, documented 400/401/405 answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cli.specfile import load_spec
from tests.api.conftest import auth

TOO_BIG = 2**63  # one past the databases' 64-bit integers


def created_job(client: TestClient, spec: dict[str, Any]) -> str:
    r = client.post("/v1/jobs", json=spec, headers=auth())
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_integers_past_64_bits_are_422s_not_500s(client: TestClient, spec: dict[str, Any]) -> None:
    job = created_job(client, spec)
    r = client.get(f"/v1/jobs/{job}/metrics?after_step={TOO_BIG}", headers=auth())
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == "query.after_step", r.text
    assert client.get(f"/v1/jobs/{job}/metrics?after_step={TOO_BIG - 1}", headers=auth()).status_code == 200
    json_view = {**auth(), "Accept": "application/json"}
    r = client.get(f"/v1/jobs/{job}/events?after={TOO_BIG}", headers=json_view)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == "query.after", r.text
    assert client.get(f"/v1/jobs/{job}/events?after={TOO_BIG - 1}", headers=json_view).status_code == 200
    r = client.get(f"/v1/jobs/{job}/events", headers={**auth(), "Last-Event-ID": str(TOO_BIG) * 2})
    assert r.status_code == 400


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("resources", "max_retries", False),
        ("resources", "num_workers", True),
        ("training", "max_steps", "5"),
        ("training", "seed", 2**64),
        ("training", "warmup_steps", TOO_BIG),
        ("training", "learning_rate", "5e-6"),
        ("training", "use_gpu", 1),
        ("loss", "beta", True),
    ],
)
def test_numbers_and_booleans_are_strict_and_bounded(
    client: TestClient, spec: dict[str, Any], section: str, field: str, value: Any
) -> None:
    body = {**spec, section: {**spec.get(section, {}), field: value}}
    r = client.post("/v1/jobs", json=body, headers=auth())
    assert r.status_code == 422, r.text
    assert f"{section}.{field}" in {e["loc"] for e in r.json()["errors"]}, r.json()


def test_a_number_past_floats_is_refused(client: TestClient, spec: dict[str, Any]) -> None:
    body = json.dumps(spec).replace('"max_length": 64', '"max_length": 64, "learning_rate": 1e400')
    r = client.post("/v1/jobs", content=body, headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 422 and "training.learning_rate" in r.text, r.text


def test_yaml_specs_keep_reading_exponent_floats(tmp_path: Path, spec: dict[str, Any]) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        f"name: y\nmodel: {spec['model']}\ndataset: {{train: {spec['dataset']['train']}}}\n"
        "training: {learning_rate: 5e-6, max_steps: 3}\nloss: {beta: 1E-1}\n",
        encoding="utf-8",
    )
    loaded = load_spec(path, ["training.weight_decay=1e-2"])
    assert loaded.training.learning_rate == 5e-6 and loaded.loss.beta == 0.1
    assert loaded.training.weight_decay == 0.01 and loaded.training.max_steps == 3


def test_every_answer_the_middleware_gives_is_documented(client: TestClient) -> None:
    doc = client.get("/openapi.json", headers=auth()).json()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearer"]["description"],
    }
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            where = f"{method.upper()} {path}"
            if path in ("/healthz", "/readyz"):
                assert op["security"] == [], where
                continue
            assert op["security"] == [{"bearer": []}], where
            assert "401" in op["responses"], where
            if "requestBody" in op or any(p["in"] in ("query", "header") for p in op.get("parameters", [])):
                assert "400" in op["responses"], where
    assert "400" in doc["paths"]["/v1/jobs"]["post"]["responses"]
    assert "400" in doc["paths"]["/v1/jobs"]["get"]["responses"]
    assert "400" in doc["paths"]["/v1/datasets"]["post"]["responses"]


def test_the_400s_are_the_documented_problems(client: TestClient) -> None:
    headers = {**auth(), "Content-Type": "application/json"}
    r = client.post("/v1/jobs", content=b"{not json", headers=headers)
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
    r = client.get("/v1/jobs?after=not-a-cursor", headers=auth())
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"
    r = client.post(
        "/v1/datasets", content=b"--x\r\nbroken", headers={**auth(), "Content-Type": "multipart/form-data"}
    )
    assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"


def test_a_method_not_served_gets_405_naming_every_method_the_path_serves(client: TestClient) -> None:
    for method in ("OPTIONS", "PATCH", "DELETE"):
        r = client.request(method, "/v1/jobs", headers=auth())
        assert r.status_code == 405, r.text
        assert r.headers["allow"] == "GET, POST"
        assert r.headers["content-type"] == "application/problem+json"
    r = client.request("OPTIONS", "/v1/jobs/job_01jd3m5k8q9t0v1w2x3y4z5a6b", headers=auth())
    assert r.status_code == 405 and r.headers["allow"] == "GET"
