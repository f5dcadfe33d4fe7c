"""Several API processes on one database (replicas behind a balancer): start together, share idempotency."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from core.store import upgrade
from tests.serving import api_only_env, free_port, wait_until_up
from tests.store.conftest import BACKENDS, empty_database

TOKEN = "tok-replica-6c1f0a9e"
REPLICAS = 2


@contextmanager
def replicas(url: str, root: Path) -> Iterator[list[str]]:
    """REPLICAS `minordpo serve` processes (API only) started at the same moment on one database."""
    upgrade(url)
    (root / "model").mkdir(exist_ok=True)
    (root / "train.jsonl").write_text('{"prompt": "Q?", "chosen": " A.", "rejected": " B."}\n')
    ports: set[int] = set()
    while len(ports) < REPLICAS:
        ports.add(free_port())
    procs: list[subprocess.Popen[bytes]] = []
    with ExitStack() as stack:
        for i, port in enumerate(sorted(ports)):
            log = stack.enter_context((root / f"serve-{i}.log").open("wb"))
            env = api_only_env(url, root, f"team-r:{TOKEN}", port)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "cli.main", "serve"], cwd=root, env=env, stdout=log, stderr=log
                )
            )
        urls = [f"http://127.0.0.1:{port}" for port in sorted(ports)]
        try:
            for i, (proc, base) in enumerate(zip(procs, urls, strict=True)):
                wait_until_up(proc, f"{base}/readyz", log=(root / f"serve-{i}.log").read_text)
            yield urls
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_replicas_start_together_and_share_jobs_and_idempotency(backend: str, tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with empty_database(backend, tmp_path) as url, replicas(url, tmp_path) as urls:
        spec = {
            "name": "r",
            "model": str(tmp_path / "model"),
            "dataset": {"train": str(tmp_path / "train.jsonl")},
        }

        def create(i: int) -> tuple[str, str]:
            key = f"replica-key-{i % 8}"
            r = httpx.post(
                f"{urls[i % REPLICAS]}/v1/jobs", json=spec, headers={**headers, "Idempotency-Key": key}
            )
            assert r.status_code in (200, 201), r.text
            return key, r.json()["id"]

        with ThreadPoolExecutor(max_workers=16) as pool:
            made = list(pool.map(create, range(40)))
        by_key: dict[str, set[str]] = {}
        for key, job_id in made:
            by_key.setdefault(key, set()).add(job_id)
        assert len(by_key) == 8 and all(
            len(ids) == 1 for ids in by_key.values()
        )  # one job per key, any replica

        job_id = made[0][1]
        cancelled = httpx.post(f"{urls[1]}/v1/jobs/{job_id}/cancel", headers=headers)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert httpx.get(f"{urls[0]}/v1/jobs/{job_id}", headers=headers).json()["status"] == "cancelled"
        listed = {j["id"] for j in httpx.get(f"{urls[0]}/v1/jobs", headers=headers).json()["data"]}
        assert listed == {ids.pop() for ids in by_key.values()}
        clash = httpx.post(
            f"{urls[1]}/v1/jobs",
            json={**spec, "name": "other"},
            headers={**headers, "Idempotency-Key": "replica-key-0"},
        )
        assert clash.status_code == 409
