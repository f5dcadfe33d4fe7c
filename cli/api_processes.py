"""`minordpo serve --api-workers N`: uvicorn's supervisor in the parent, one app per worker process.

The parent binds the socket, keeps the embedded dispatcher (there is only ever one) and restarts a
worker that dies. Each worker builds its app from the same environment, shares its Prometheus counts
through prometheus_client's multiprocess folder, asks Ray's Jobs API itself for `/readyz`, and stops
when the parent is gone (a `kill -9` of `serve` must not leave workers holding the port).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from core.settings import Settings

log = logging.getLogger("minordpo.serve")

RAY_JOBS_URL_ENV = "_MINORDPO_RAY_JOBS_URL"  # the dispatcher's Ray Jobs API, for the workers' /readyz
PARENT_PID_ENV = "_MINORDPO_SERVE_PID"
PARENT_POLL_S = 0.5
# uvicorn options of every `serve`: our middleware writes the access log and the JSON log handler is ours
SERVER_OPTIONS: dict[str, Any] = {
    "log_config": None,
    "access_log": False,
    "server_header": False,
    "timeout_graceful_shutdown": 10,
}


def worker_app() -> Any:
    """The app of one API worker: uvicorn calls this factory in each worker process.

    A configuration that cannot serve exits with uvicorn's start-up failure code, so the supervisor
    stops instead of restarting the worker forever.
    """
    from uvicorn.config import STARTUP_FAILURE

    from api.logging import configure_logging
    from api.main import create_app

    settings = Settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    try:
        app = create_app(settings)
    except Exception:
        log.exception("API worker %d could not build the app", os.getpid())
        sys.exit(STARTUP_FAILURE)
    ray_jobs_url = os.environ.get(RAY_JOBS_URL_ENV)
    if ray_jobs_url:
        app.state.readiness_checks["ray"] = lambda: require_ray_jobs_api(ray_jobs_url)
    parent = os.environ.get(PARENT_PID_ENV)
    if parent:
        exit_with_parent(int(parent))
    gc.collect()
    gc.freeze()  # start-up objects leave the collector's view: full collections stay short under load
    return app


def require_ray_jobs_api(url: str) -> None:
    """Readiness check: raises when Ray's Jobs API does not answer at `url`."""
    from workers.ray_control import RayUnavailableError, jobs_api_reachable

    if not jobs_api_reachable(url):
        raise RayUnavailableError("Ray is not reachable")


def exit_with_parent(parent_pid: int, interval_s: float = PARENT_POLL_S) -> threading.Thread:
    """SIGTERM this process (uvicorn's graceful stop) once `parent_pid` is no longer its parent."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        log.warning("serve process %d is gone: stopping API worker %d", parent_pid, os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def _metrics_folder() -> tuple[str, bool]:
    """The multiprocess folder (the operator's PROMETHEUS_MULTIPROC_DIR, emptied, or a new temp one)
    and whether it is ours to remove."""
    from api.metrics import MULTIPROC_DIR_ENV

    given = os.environ.get(MULTIPROC_DIR_ENV)
    if not given:
        return tempfile.mkdtemp(prefix="minordpo-metrics-"), True
    folder = Path(given)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):  # counts of an earlier run would add to this one's
        stale.unlink()
    return str(folder), False


def run_api_workers(settings: Settings, *, ray_jobs_url: str | None = None) -> int:
    """Serve the API from `settings.api_workers` processes until SIGINT/SIGTERM; the exit code.

    2 when a worker could not start (its log says why), else 0.
    """
    from uvicorn import Config
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    from api.metrics import MULTIPROC_DIR_ENV

    folder, ours = _metrics_folder()
    os.environ[MULTIPROC_DIR_ENV] = folder
    os.environ.update(MINORDPO_HOST=settings.host, MINORDPO_PORT=str(settings.port))
    os.environ[PARENT_PID_ENV] = str(os.getpid())
    if ray_jobs_url:
        os.environ[RAY_JOBS_URL_ENV] = ray_jobs_url
    config = Config(
        "cli.api_processes:worker_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.api_workers,
        **SERVER_OPTIONS,
    )
    sock = config.bind_socket()
    supervisor = Multiprocess(config, sockets=[sock])
    try:
        supervisor.run()
    finally:
        sock.close()
        if ours:
            shutil.rmtree(folder, ignore_errors=True)
    failed = [p.pid for p in supervisor.processes if p.exitcode == STARTUP_FAILURE]
    if failed:
        log.error("API worker(s) %s failed to start; see their log lines above", failed)
        return 2
    return 0
