"""Helpers for the service end-to-end tests: a `minordpo serve` subprocess and small HTTP wrappers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import DATA, REPO
from tests.serving import free_port, wait_until_up

TERMINAL = {"succeeded", "failed", "cancelled"}


class Server:
    """A `minordpo serve` subprocess that can be killed and started again on the same state."""

    def __init__(self, root: Path, model_dir: Path, data_file: Path, **env: str) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MINORDPO_")}
        self.env.update(
            MINORDPO_DATABASE_URL=f"sqlite:///{root / 'var' / 'db.sqlite'}",
            MINORDPO_ARTIFACTS_DIR=str(root / "var" / "artifacts"),
            MINORDPO_ALLOWED_PATHS=os.pathsep.join(
                [str(root), str(model_dir), str(data_file.parent), str(DATA)]
            ),
            MINORDPO_PORT=str(self.port),
            MINORDPO_RAY_STATE_FILE=str(root / "var" / "ray-head.json"),
            MINORDPO_RAY_NUM_CPUS="2",
            MINORDPO_MAX_CONCURRENT_JOBS="1",
            MINORDPO_DISPATCH_INTERVAL_S="0.5",
            MINORDPO_WEBHOOK_ALLOW_PRIVATE="true",  # the tests' webhook receiver is on loopback
            PYTHONPATH=str(REPO),
        )
        self.env.update(env)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.root / "serve.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve"], cwd=self.root, env=self.env, stdout=log, stderr=log
        )
        wait_until_up(self.proc, f"{self.url}/readyz", log=(self.root / "serve.log").read_text, timeout_s=180)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(90)

    def head_pid(self) -> int | None:
        state = self.root / "var" / "ray-head.json"
        return int(json.loads(state.read_text())["pid"]) if state.exists() else None


def job_body(model: Path, data: Path, *, steps: int = 6, **resources: Any) -> dict[str, Any]:
    return {
        "name": "e2e",
        "model": str(model),
        "dataset": {"train": str(data), "max_rows": 64},
        "loss": {"type": "minor_dpo", "beta": 0.1},
        "training": {
            "max_steps": steps,
            "batch_size": 4,
            "max_length": 128,
            "learning_rate": 1e-3,
            "checkpoint_every": 3,
        },
        "resources": {"num_workers": 2, "cpus_per_worker": 1, **resources},
    }


def submit(server: Server, body: dict[str, Any]) -> str:
    resp = httpx.post(f"{server.url}/v1/jobs", json=body, timeout=30)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def get(server: Server, job_id: str) -> dict[str, Any]:
    return httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=10).json()


def wait_for(server: Server, job_id: str, pred: Any, timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get(server, job_id)
        if pred(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"timed out; job is {job}")


def metric_steps(server: Server, job_id: str) -> list[int]:
    rows = httpx.get(f"{server.url}/v1/jobs/{job_id}/metrics", params={"names": "loss"}, timeout=10).json()[
        "data"
    ]
    return [r["step"] for r in rows if r.get("loss") is not None]
