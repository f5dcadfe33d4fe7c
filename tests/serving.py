"""Helpers for tests that run a real server process: a free loopback port, and waiting until it answers."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from workers.ports import listen_ports


def api_only_env(database_url: str, root: Path, tokens: str, port: int, **extra: str) -> dict[str, str]:
    """Environment for a `minordpo serve` child that serves the API only (no dispatcher, no Ray),
    with artifacts and allowed paths under `root`; this process's MINORDPO_* settings are dropped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINORDPO_")}
    env.update(
        MINORDPO_DATABASE_URL=database_url,
        MINORDPO_ARTIFACTS_DIR=str(root / "artifacts"),
        MINORDPO_API_TOKENS=tokens,
        MINORDPO_ALLOWED_PATHS=str(root),
        MINORDPO_PORT=str(port),
        MINORDPO_EMBEDDED_DISPATCHER="false",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
        **extra,
    )
    return env


def free_port() -> int:
    """A TCP port that nothing listens on right now, from outside the kernel's ephemeral range: a server
    started seconds later still finds it free (an outgoing connection could take an ephemeral one)."""
    return listen_ports(1)[0]


def wait_until_up(
    proc: subprocess.Popen,
    url: str,
    *,
    log: Callable[[], str],
    timeout_s: float = 60.0,
    interval_s: float = 0.2,
) -> None:
    """Poll `url` until it answers 200; fail the test with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited early ({proc.returncode}):\n{log()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not answer {url} within {timeout_s:.0f} s:\n{log()[-3000:]}")
        time.sleep(interval_s)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
