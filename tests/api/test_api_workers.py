"""`minordpo serve --api-workers N`: one socket, metrics summed over the workers, a dead worker replaced,
no worker outliving its parent; the worker app's own start-up checks."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from cli.api_processes import PARENT_PID_ENV, RAY_JOBS_URL_ENV, worker_app
from tests.api.conftest import REPO, TOKENS
from tests.api.test_server import serve_env
from tests.serving import free_port, pid_alive, wait_until_up

HEADERS = {"Authorization": f"Bearer {TOKENS['team-a']}"}
REQUESTS_404 = 'minordpo_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"}'


def children(pid: int) -> list[int]:
    """The API worker processes of `pid` (Linux /proc; multiprocessing's resource tracker left out)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"spawn_main" in cmdline:
                found.append(int(child))
    return found


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    env = serve_env(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"))
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--api-workers", "2"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{env['MINORDPO_PORT']}"
    try:
        wait_until_up(proc, f"{base}/readyz", log=log.read_text)
        yield base, proc, log
    finally:
        workers = children(proc.pid) if proc.poll() is None else []
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in workers:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def count_404s(base: str) -> float:
    for line in httpx.get(f"{base}/metrics", headers=HEADERS).text.splitlines():
        if line.startswith(REQUESTS_404):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_two_api_workers_serve_one_port_sum_their_metrics_and_stop_cleanly(
    two_workers: tuple[str, subprocess.Popen[bytes], Path], tmp_path: Path
) -> None:
    base, proc, log = two_workers
    workers = children(proc.pid)
    assert len(workers) == 2, f"two API worker processes under serve: {workers}"
    ready = httpx.get(f"{base}/readyz").json()
    assert ready["checks"] == {"database": "ok"}, "no embedded dispatcher here: nothing to ask Ray"

    def get_missing(i: int) -> int:
        with httpx.Client(base_url=base, headers=HEADERS) as client:  # a new connection each time
            return client.get(f"/v1/jobs/missing-{i}").status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(get_missing, range(60))) == {404}
    assert count_404s(base) == 60, "every worker's requests counted, each once, in any worker's scrape"
    counted_by = {p.name.split("_")[1].removesuffix(".db") for p in (tmp_path / "prom").glob("counter_*.db")}
    assert counted_by <= {str(w) for w in workers}

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text()[-3000:]
    assert not any(pid_alive(w) for w in workers)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz", timeout=2)


def test_a_dead_api_worker_is_replaced_and_none_outlives_serve(
    two_workers: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    base, proc, log = two_workers
    first, second = children(proc.pid)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(children(proc.pid)) == 2 and first not in children(proc.pid), 30, "a new worker")
    replacement = next(pid for pid in children(proc.pid) if pid != second)
    wait_for(lambda: all(httpx.get(f"{base}/healthz").status_code == 200 for _ in range(10)), 30, "serving")

    proc.kill()  # kill -9: no chance to stop its workers
    proc.wait(10)
    wait_for(lambda: not pid_alive(second) and not pid_alive(replacement), 15, "the orphaned workers to exit")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz", timeout=2)
    assert "is gone: stopping API worker" in log.read_text()


def test_metrics_of_separate_worker_processes_add_up(tmp_path: Path) -> None:
    folder = tmp_path / "prom"
    folder.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder), "PYTHONPATH": str(REPO)}
    observe = (
        "import sys; from api.metrics import ApiMetrics; m = ApiMetrics()\n"
        "for _ in range(int(sys.argv[1])): m.observe('GET', '/v1/jobs', 200, 0.002)\n"
    )
    for count in ("3", "4"):
        subprocess.run([sys.executable, "-c", observe, count], env=env, check=True, timeout=60)
    render = "from api.metrics import ApiMetrics; print(ApiMetrics().render().decode())"
    text = subprocess.run(
        [sys.executable, "-c", render], env=env, check=True, timeout=60, capture_output=True, text=True
    ).stdout
    assert 'minordpo_http_requests_total{method="GET",route="/v1/jobs",status="200"} 7.0' in text
    assert 'minordpo_http_request_duration_seconds_count{method="GET",route="/v1/jobs"} 7.0' in text
    assert (
        'minordpo_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/v1/jobs"} 7.0' in text
    )


@pytest.fixture
def worker_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    from core.store import upgrade

    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(url)
    for key in [k for k in os.environ if k.startswith("MINORDPO_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MINORDPO_DATABASE_URL", url)
    monkeypatch.setenv("MINORDPO_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("MINORDPO_API_TOKENS", f"team-a:{TOKENS['team-a']}")
    monkeypatch.delenv(PARENT_PID_ENV, raising=False)
    yield tmp_path
    gc.unfreeze()  # worker_app freezes what exists, as it should in a worker; not in this test process


def test_worker_app_reports_ray_unreachable_in_readiness(
    worker_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RAY_JOBS_URL_ENV, f"http://127.0.0.1:{free_port()}")
    with TestClient(worker_app()) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"] == {"database": "ok", "ray": "error: RayUnavailableError"}

    monkeypatch.delenv(RAY_JOBS_URL_ENV)
    with TestClient(worker_app()) as client:
        assert client.get("/readyz").json()["checks"] == {"database": "ok"}


def test_worker_app_that_cannot_start_exits_with_the_start_up_failure_code(
    worker_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from uvicorn.config import STARTUP_FAILURE

    monkeypatch.setenv("MINORDPO_API_TOKENS_FILE", str(worker_env / "no-such-tokens-file"))
    with pytest.raises(SystemExit) as exit_info:
        worker_app()
    assert exit_info.value.code == STARTUP_FAILURE
