"""`minordpo serve --api-workers N`: uvicorn's supervisor in the parent, one app per worker process.

The parent binds the socket, keeps the embedded dispatcher (there is only ever one) and restarts a
worker that dies (SIGHUP replaces them one by one). Each worker builds its app from the same
environment, shares its Prometheus counts through prometheus_client's multiprocess folder, asks Ray's
Jobs API itself for `/readyz`, and stops when the parent is gone (a `kill -9` of `serve` must not
leave workers holding the port).
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from socket import socket
from typing import Any

from core.settings import Settings

log = logging.getLogger("minordpo.serve")

RAY_JOBS_URL_ENV = "_MINORDPO_RAY_JOBS_URL"  # the dispatcher's Ray Jobs API, for the workers' /readyz
PARENT_PID_ENV = "_MINORDPO_SERVE_PID"
PARENT_POLL_S = 0.5
RETRY_DELAY_S = 2.0  # before a worker that failed for a passing reason exits to be started again
# uvicorn options of every `serve`: our middleware writes the access log and the JSON log handler is ours
SERVER_OPTIONS: dict[str, Any] = {
    "log_config": None,
    "access_log": False,
    "server_header": False,
    "timeout_graceful_shutdown": 10,
}
# The files prometheus_client's multiprocess mode writes (values.py: `{type}_{pid}.db`, gauges with a mode)
_PROMETHEUS_FILES = ("counter_*.db", "histogram_*.db", "summary_*.db", "gauge_*.db")


def worker_app() -> Any:
    """The app of one API worker: uvicorn calls this factory in each worker process.

    A configuration that cannot serve exits with uvicorn's start-up failure code, which stops the
    supervisor instead of restarting the worker forever; anything else (the database blinked) exits
    after a pause, and the supervisor starts the worker again.
    """
    from pydantic import ValidationError
    from uvicorn.config import STARTUP_FAILURE

    from api.logging import configure_logging
    from api.main import create_app
    from api.services.auth import StartupError

    try:
        settings = Settings()
        configure_logging(settings.log_level, json_lines=settings.log_json, log_format=settings.log_format)
        app = create_app(settings)
        ray_jobs_url = os.environ.get(RAY_JOBS_URL_ENV)
        if ray_jobs_url:
            from workers.ray_env import use_token_auth

            use_token_auth()  # before any Ray import: Ray reads its auth mode once per process
            # paid at start-up, not by the first /readyz
            for module in ("workers.ray_jobs_client", "ray.job_submission"):
                importlib.import_module(module)
            app.state.readiness_checks["ray"] = lambda: require_ray_jobs_api(
                local_head_url(settings) or ray_jobs_url
            )
    except (StartupError, ValidationError):
        log.exception("API worker %d cannot serve with this configuration", os.getpid())
        sys.exit(STARTUP_FAILURE)
    except Exception:
        log.exception("API worker %d could not start; it exits to be started again", os.getpid())
        time.sleep(RETRY_DELAY_S)
        sys.exit(1)
    parent = os.environ.get(PARENT_PID_ENV)
    if parent:
        exit_with_parent(int(parent))
    gc.collect()
    gc.freeze()  # start-up objects leave the collector's view: full collections stay short under load
    return app


def local_head_url(settings: Settings) -> str | None:
    """The Jobs API of the local head the dispatcher records now (it starts a new one when its head dies)."""
    from workers.ray_head import LocalHead

    head = None if settings.ray_address else LocalHead.load(settings.ray_state_file)
    return head.dashboard_url if head is not None else None


def require_ray_jobs_api(url: str) -> None:
    """Readiness check: raises when Ray's Jobs API does not answer at `url`."""
    from workers.ray_jobs_client import RayUnavailableError, jobs_api_reachable

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


def clear_metric_files(folder: Path) -> None:
    """Remove prometheus_client's files from `folder` (counts of an earlier run would add to this one's)."""
    folder.mkdir(parents=True, exist_ok=True)
    for pattern in _PROMETHEUS_FILES:
        for stale in folder.glob(pattern):
            stale.unlink(missing_ok=True)


class ApiWorkers:
    """The parent's side: the metrics folder and the bound socket first, then the supervisor's run."""

    def __init__(self, settings: Settings) -> None:
        from uvicorn import Config

        from api.metrics import multiprocess_dir

        self.settings = settings
        given = multiprocess_dir()  # the operator's: `serve` emptied it of an earlier run's files
        self._own_folder = not given
        self.folder = Path(given) if given else Path(tempfile.mkdtemp(prefix="minordpo-metrics-"))
        self.socket: socket | None = None
        self.config = Config(
            "cli.api_processes:worker_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.api_workers,
            **SERVER_OPTIONS,
        )
        try:
            self.socket = self.config.bind_socket()  # logs the error and exits 3 when taken
        except SystemExit:
            self.close()
            raise

    def run(self, *, ray_jobs_url: str | None = None) -> int:
        """Serve until SIGINT/SIGTERM; the exit code: 2 when a worker could not start (its log says why)."""
        from uvicorn.config import STARTUP_FAILURE
        from uvicorn.supervisors import Multiprocess
        from uvicorn.supervisors.multiprocess import SIGNALS

        from api.metrics import MULTIPROC_DIR_ENV

        os.environ[MULTIPROC_DIR_ENV] = str(self.folder)
        os.environ.update(
            MINORDPO_HOST=self.settings.host,
            MINORDPO_PORT=str(self.settings.port),
            MINORDPO_API_WORKERS=str(self.settings.api_workers),
        )
        os.environ[PARENT_PID_ENV] = str(os.getpid())
        if ray_jobs_url:
            os.environ[RAY_JOBS_URL_ENV] = ray_jobs_url
        handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
        supervisor = Multiprocess(self.config, sockets=[self.socket])
        try:
            supervisor.run()
        finally:
            for sig, handler in handlers.items():  # a second Ctrl+C while the dispatcher stops still works
                signal.signal(sig, handler)
            self.close()
        failed = [p.pid for p in supervisor.processes if p.exitcode == STARTUP_FAILURE]
        if failed:
            log.error("API worker(s) %s failed to start; see their log lines above", failed)
            return 2
        return 0

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)
