"""A `minordpo serve` child (local Ray, SQLite) in a work folder, started for the study and always stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    from workers.ports import listen_ports

    return listen_ports(1)[0]


def service_env(root: Path, port: int, allowed: list[Path], concurrent: int) -> dict[str, str]:
    """The child's environment: state under `root`, `concurrent` jobs at once on a local Ray head of its
    own (the service gives each head state file its own Ray temp folder, workers.ray_head)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINORDPO_")}
    env.update(
        MINORDPO_DATABASE_URL=f"sqlite:///{root / 'db.sqlite'}",
        MINORDPO_ARTIFACTS_DIR=str(root / "artifacts"),
        MINORDPO_ALLOWED_PATHS=os.pathsep.join(str(p) for p in allowed),
        MINORDPO_PORT=str(port),
        MINORDPO_RAY_STATE_FILE=str(root / "ray-head.json"),
        MINORDPO_RAY_NUM_CPUS=str(max(os.cpu_count() or 1, concurrent)),  # 1-CPU jobs, `concurrent` at once
        MINORDPO_MAX_CONCURRENT_JOBS=str(concurrent),
        MINORDPO_DISPATCH_INTERVAL_S="0.5",
        PYTHONPATH=str(REPO),
    )
    return env


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float = 300.0) -> None:
    """Poll /readyz until it answers 200; raise with the log's tail if the child exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the service did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 90.0) -> None:
    """SIGTERM (the service stops its jobs and its local Ray head), SIGKILL if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


@contextlib.contextmanager
def running_service(root: Path, allowed: list[Path], concurrent: int) -> Iterator[str]:
    """Start a service with its state in `root`; yield its URL; stop it on exit, error or Ctrl-C."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = root / "serve.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve"],
            cwd=root,
            env=service_env(root, port, allowed, concurrent),
            stdout=out,
            stderr=out,
            start_new_session=True,  # Ctrl-C reaches this script only; it stops the service in order
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log)
        yield url
    finally:
        stop(proc)
