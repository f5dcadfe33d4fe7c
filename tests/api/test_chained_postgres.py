"""Chained jobs and the estimate's throughput history on PostgreSQL (JSON path and metric reads; skipped without a server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.models import make_tiny_model
from core.settings import Settings
from core.store import append_event, append_metrics, transition
from tests.api.conftest import auth
from tests.conftest import GPT2_FILE

pytestmark = pytest.mark.postgres


def test_chain_and_history_on_postgres(
    pg_client: tuple[TestClient, Any], roots: Path, settings: Settings
) -> None:
    client, db = pg_client
    model = make_tiny_model(roots / "models" / "tiny", tokenizer=GPT2_FILE, size="tiny", seed=0)
    spec = {
        "name": "pg",
        "model": str(model),
        "dataset": {"train": str(roots / "train.jsonl")},
        "training": {"max_steps": 4, "batch_size": 2, "max_length": 64},
    }
    r = client.post("/v1/jobs", json=spec, headers=auth())
    assert r.status_code == 201, r.text
    source = r.json()["id"]
    final = settings.artifacts_dir / "jobs" / source / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}", encoding="utf-8")
    with db.write() as session:
        transition(session, source, "running")
        append_metrics(session, source, [{"step": 1, "time": 10.0, "num_tokens": 50.0}])
        append_metrics(session, source, [{"step": 4, "time": 12.0, "num_tokens": 250.0}])
        append_event(session, source, "final_model", "final model saved", {"path": str(final)})
        transition(session, source, "succeeded")

    r = client.post("/v1/jobs", json={**spec, "model": {"from_job": source}}, headers=auth())
    assert r.status_code == 201, r.text
    derived = client.get(f"/v1/jobs/{source}/derived", headers=auth()).json()["data"]
    assert [(d["id"], d["source_step"]) for d in derived] == [(r.json()["id"], None)]
    assert client.get(f"/v1/jobs/{source}/derived", headers=auth("team-b")).status_code == 404

    estimate = client.post("/v1/jobs:validate", json=spec, headers=auth()).json()["estimate"]
    assert estimate["tokens_per_second"] == pytest.approx(100.0)
    assert estimate["duration_s"] == pytest.approx(estimate["total_train_tokens"] / 100.0)
