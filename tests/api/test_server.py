"""A real `minordpo serve` process: start-up checks, concurrency through HTTP, clean shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import PAIRS, REPO, TOKENS, write_jsonl
from tests.serving import free_port, wait_until_up

TOKEN_ENV = ",".join(f"{p}:{t}" for p, t in TOKENS.items())


def serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINORDPO_")}
    env.update(
        {
            "MINORDPO_DATABASE_URL": f"sqlite:///{tmp_path / 'var' / 'server.db'}",
            "MINORDPO_ARTIFACTS_DIR": str(tmp_path / "var" / "artifacts"),
            "MINORDPO_API_TOKENS": TOKEN_ENV,
            "MINORDPO_ALLOWED_PATHS": str(tmp_path),
            "MINORDPO_PORT": str(free_port()),
            "PYTHONPATH": str(REPO),
            "MINORDPO_EMBEDDED_DISPATCHER": "false",  # the API alone; Ray-backed serving is tested in tests/workers
        }
    )
    env.update(extra)
    return env


def run_serve(env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[str]]]:
    env = serve_env(tmp_path)
    proc = run_serve(env, tmp_path)
    base = f"http://127.0.0.1:{env['MINORDPO_PORT']}"
    wait_until_up(proc, f"{base}/healthz", log=lambda: proc.stdout.read() if proc.stdout else "")
    yield base, tmp_path, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_real_server_smoke_concurrency_and_clean_stop(
    server: tuple[str, Path, subprocess.Popen[str]],
) -> None:
    base, root, proc = server
    (root / "model").mkdir()
    data = write_jsonl(root / "train.jsonl", PAIRS)
    spec: dict[str, Any] = {"name": "served", "model": str(root / "model"), "dataset": {"train": str(data)}}
    headers = {"Authorization": f"Bearer {TOKENS['team-a']}"}
    assert (root / "var" / "server.db").exists(), "the fresh SQLite database was created and migrated"
    assert httpx.get(f"{base}/readyz").status_code == 200
    assert httpx.get(f"{base}/v1/jobs").status_code == 401

    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:

        def post(i: int) -> tuple[int, str, str]:
            r = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": f"key-{i % 10}"})
            return r.status_code, f"key-{i % 10}", r.json().get("id", r.text)

        with ThreadPoolExecutor(max_workers=25) as pool:
            results = list(pool.map(post, range(50)))
        assert all(status in (200, 201) for status, _, _ in results), results
        ids_by_key: dict[str, set[str]] = {}
        for _, key, job_id in results:
            ids_by_key.setdefault(key, set()).add(job_id)
        assert len(ids_by_key) == 10 and all(len(v) == 1 for v in ids_by_key.values())
        listed = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
        assert len(listed) == 10
        conflict = client.post(
            "/v1/jobs", json={**spec, "name": "changed"}, headers={"Idempotency-Key": "key-3"}
        )
        assert conflict.status_code == 409
        assert conflict.headers["content-type"] == "application/problem+json"
        r = client.get("/v1/jobs/job_missing", headers={"X-Request-ID": "smoke-1"})
        assert r.status_code == 404 and r.headers["x-request-id"] == "smoke-1"

    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit by SIGTERM).
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    for token in TOKENS.values():
        assert token not in output
    assert '"request_id": "smoke-1"' in output and '"status": 404' in output


def test_serve_refuses_a_stale_schema_and_open_public_bind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.chdir(tmp_path)
    db = tmp_path / "var" / "server.db"
    db.parent.mkdir(parents=True)
    db.touch()  # exists, but was never migrated
    env = serve_env(tmp_path)
    result = CliRunner().invoke(app, ["serve"], env=env)
    assert result.exit_code == 2, result.output
    assert "minordpo db upgrade" in result.output

    env = serve_env(tmp_path, MINORDPO_HOST="0.0.0.0", MINORDPO_API_TOKENS="")
    result = CliRunner().invoke(app, ["serve"], env=env)
    assert result.exit_code == 2, result.output
    assert "refusing to serve on 0.0.0.0 without API tokens" in result.output
