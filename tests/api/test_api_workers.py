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
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from cli import api_processes
from cli.api_processes import PARENT_PID_ENV, RAY_JOBS_URL_ENV, clear_metric_files, worker_app
from tests.api.conftest import REPO, TOKENS
from tests.api.test_server import serve_env
from tests.serving import free_port, wait_until_up

HEADERS = {"Authorization": f"Bearer {TOKENS['team-a']}"}
REQUESTS_404 = 'minordpo_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"}'


def alive(pid: int) -> bool:
    """Running (a zombie that nobody has reaped yet counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Serve:
    """`minordpo serve --api-workers 2` and every worker pid seen, so teardown can reap orphans."""

    base: str
    proc: subprocess.Popen[bytes]
    log: Path
    seen: set[int] = field(default_factory=set)

    def workers(self) -> list[int]:
        """The live API worker processes (multiprocessing's resource tracker left out)."""
        found: list[int] = []
        try:
            kids = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return found
        for child in kids:
            try:
                if "spawn_main" in " ".join(child.cmdline()) and alive(child.pid):
                    found.append(child.pid)
            except psutil.NoSuchProcess:
                continue
        self.seen.update(found)
        return found


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[Serve]:
    env = serve_env(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"))
    # counts an earlier run left in the operator's folder: `serve` must start from zero
    stale = "from api.metrics import ApiMetrics; ApiMetrics().observe('GET', '/v1/jobs/{job_id}', 404, 0.001)"
    subprocess.run([sys.executable, "-c", stale], env=env, check=True, timeout=60)
    assert list((tmp_path / "prom").glob("counter_*.db"))
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--api-workers", "2"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    serve = Serve(f"http://127.0.0.1:{env['MINORDPO_PORT']}", proc, log)
    try:
        wait_until_up(proc, f"{serve.base}/readyz", log=log.read_text)
        wait_for(lambda: len(serve.workers()) == 2, 30, "two API workers")
        yield serve
    finally:
        serve.workers()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in serve.seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def count_404s(base: str) -> float:
    for line in httpx.get(f"{base}/metrics", headers=HEADERS).text.splitlines():
        if line.startswith(REQUESTS_404):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_two_api_workers_serve_one_port_sum_their_metrics_and_stop_cleanly(
    two_workers: Serve, tmp_path: Path
) -> None:
    base, proc = two_workers.base, two_workers.proc
    workers = two_workers.workers()
    ready = httpx.get(f"{base}/readyz").json()
    assert ready["checks"] == {"database": "ok"}, "no embedded dispatcher here: nothing to ask Ray"

    def get_missing(i: int) -> int:
        with httpx.Client(base_url=base, headers=HEADERS) as client:  # a new connection each time
            return client.get(f"/v1/jobs/missing-{i}").status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(get_missing, range(60))) == {404}
    # counted after the response went out: a scrape may come a moment early, never with more than 60
    wait_for(lambda: count_404s(base) >= 60, 10, "the 60 requests in /metrics")
    assert count_404s(base) == 60, (
        "every worker's requests counted, each once, in any worker's scrape; none from before"
    )
    counted_by = {p.name.split("_")[1].removesuffix(".db") for p in (tmp_path / "prom").glob("counter_*.db")}
    assert counted_by <= {str(w) for w in workers}

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, two_workers.log.read_text()[-3000:]
    wait_for(lambda: not any(alive(w) for w in workers), 10, "the workers to exit")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz", timeout=2)


def test_dead_api_workers_are_replaced_and_none_outlives_serve(two_workers: Serve) -> None:
    base, proc = two_workers.base, two_workers.proc
    originals = two_workers.workers()
    for pid in originals:  # both, one after the other: the replacements alone serve afterwards
        os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda pid=pid: pid not in two_workers.workers() and len(two_workers.workers()) == 2,
            30,
            "a new worker",
        )
    replacements = two_workers.workers()
    assert not set(replacements) & set(originals)
    wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, 30, "the replacements to serve")

    proc.kill()  # kill -9: no chance to stop its workers
    proc.wait(10)
    wait_for(lambda: not any(alive(pid) for pid in replacements), 15, "the orphaned workers to exit")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz", timeout=2)
    assert "is gone: stopping API worker" in two_workers.log.read_text()


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


def test_clearing_the_metrics_folder_removes_only_prometheus_files(tmp_path: Path) -> None:
    stale = ["counter_11.db", "histogram_11.db", "gauge_livesum_11.db", "summary_11.db"]
    for name in [*stale, "minordpo.db", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    clear_metric_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["minordpo.db", "notes.txt"]


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


def test_worker_app_that_fails_for_a_passing_reason_exits_to_be_started_again(
    worker_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api_processes, "RETRY_DELAY_S", 0.0)
    down = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"  # nothing listens: refused at once
    monkeypatch.setenv("MINORDPO_DATABASE_URL", down)
    with pytest.raises(SystemExit) as exit_info:
        worker_app()
    assert exit_info.value.code == 1, "not uvicorn's start-up failure code: the supervisor restarts it"
