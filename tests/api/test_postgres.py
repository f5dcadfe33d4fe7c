"""The API on PostgreSQL: idempotent concurrent creates, pages and metric filters (skipped without a server)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from core.store import append_metrics
from tests.api.conftest import auth

pytestmark = pytest.mark.postgres


def test_api_on_postgres(pg_client: tuple[TestClient, Any], spec: dict[str, Any]) -> None:
    client, db = pg_client

    def post(i: int) -> str:
        r = client.post("/v1/jobs", json=spec, headers={**auth(), "Idempotency-Key": f"pg-{i % 10}"})
        assert r.status_code in (200, 201), r.text
        return str(r.json()["id"])

    with ThreadPoolExecutor(max_workers=16) as pool:
        ids = list(pool.map(post, range(50)))
    assert len(set(ids)) == 10
    seen: list[str] = []
    cursor = None
    while True:
        page = client.get(
            "/v1/jobs", params={"limit": 3, **({"after": cursor} if cursor else {})}, headers=auth()
        )
        seen += [j["id"] for j in page.json()["data"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(set(ids))
    assert client.get(f"/v1/jobs/{ids[0]}", headers=auth("team-b")).status_code == 404
    with db.write() as session:
        append_metrics(session, ids[0], [{"step": s, "loss": 1.0 / s, "acc": 0.5} for s in range(1, 51)])
    rows = client.get(
        f"/v1/jobs/{ids[0]}/metrics", params={"names": "loss", "max_points": 5}, headers=auth()
    ).json()["data"]
    assert [r["step"] for r in rows][0] == 1 and rows[-1]["step"] == 50 and len(rows) == 5
    assert all(set(r) == {"step", "time", "loss"} for r in rows)


def test_metric_values_past_64_bit_integers_come_back_from_jsonb(
    pg_client: tuple[TestClient, Any], spec: dict[str, Any]
) -> None:
    client, db = pg_client
    job_id = client.post("/v1/jobs", json=spec, headers=auth()).json()["id"]
    # jsonb keeps numbers as decimals: 3e19 comes back as the integer 30000000000000000000
    big = {"grad_norm": 3e19, "huge": 1.7976931348623157e308, "third": 1 / 3}
    with db.write() as session:
        append_metrics(session, job_id, [{"step": s, "time": 5.0, **big} for s in range(1, 21)])
    for params in ({}, {"max_points": 4}):
        response = client.get(f"/v1/jobs/{job_id}/metrics", params=params, headers=auth())
        assert response.status_code == 200, response.text
        rows = response.json()["data"]
        assert all({k: r[k] for k in big} == big for r in rows)
        assert [r["step"] for r in rows][-1] == 20


def test_get_job_survives_the_server_dropping_its_connections(
    pg_client: tuple[TestClient, Any], spec: dict[str, Any]
) -> None:
    """The hot read's pool has no pre-ping: a dropped connection is retried once, not a 500."""
    client, db = pg_client
    job_id = client.post("/v1/jobs", json=spec, headers=auth()).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=auth()).status_code == 200  # the pool holds a connection
    with db.engine.connect() as conn:
        killed = conn.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
    assert killed >= 1
    for _ in range(3):
        r = client.get(f"/v1/jobs/{job_id}", headers=auth())
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "queued" and r.json()["queue_position"] == 1
