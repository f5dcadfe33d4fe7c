"""A live `minordpo serve` (API only, no Ray) for client and CLI tests, plus a TCP proxy that drops traffic."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.store import Database, add_checkpoint, append_metrics, transition, update_progress
from tests.serving import api_only_env, free_port, wait_until_up

TOKEN = "tok-live-5b1e9c"
PAIRS = [{"prompt": f"Q{i}?", "chosen": f" A{i}.", "rejected": " no."} for i in range(8)]


@dataclass
class LiveServer:
    """A running server: its URL, token, database (to play the worker's part) and a folder for files."""

    url: str
    token: str
    db: Database
    root: Path

    def spec(self, name: str = "live", **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "model": str(self.root / "model"),
            "dataset": {"train": str(self.root / "train.jsonl")},
            **extra,
        }

    def run_job(self, job_id: str, steps: int = 5, *, outcome: str = "succeeded") -> None:
        """Do what a worker does: start, report `steps` metric rows and a checkpoint, then end."""
        with self.db.write() as s:
            transition(s, job_id, "running")
            update_progress(s, job_id, total_steps=steps)
        for step in range(1, steps + 1):
            with self.db.write() as s:
                append_metrics(
                    s,
                    job_id,
                    [{"step": step, "time": 1000.0 + step, "loss": 1.0 / step, "rewards/accuracies": 0.5}],
                )
        with self.db.write() as s:
            add_checkpoint(s, job_id, steps, str(self.root / "ckpt"))
        error = ("training_error", "NaN loss at step 3") if outcome == "failed" else None
        with self.db.write() as s:
            transition(s, job_id, outcome, error=error)


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("live")
    (root / "model").mkdir()
    (root / "train.jsonl").write_text("".join(__import__("json").dumps(p) + "\n" for p in PAIRS))
    db_url = f"sqlite:///{root / 'server.db'}"
    port = free_port()
    # the tests play the worker through the database
    env = api_only_env(db_url, root, f"team-live:{TOKEN}", port, MINORDPO_SSE_HEARTBEAT_S="1")
    log = (root / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve"], cwd=root, env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_up(proc, f"{url}/readyz", log=(root / "serve.log").read_text)
    db = Database(db_url)
    try:
        yield LiveServer(url, TOKEN, db, root)
    finally:
        db.dispose()
        proc.terminate()
        proc.wait(30)


class FlakyProxy:
    """A TCP proxy to a server that can drop the next response (after the server got the request) or cut a stream."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.drop_next_response = False
        self.cut_next_after: int | None = None
        self.dropped = 0
        self.cuts = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            state: dict[str, Any] = {"drop": False, "budget": None}
            threading.Thread(target=self._upward, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._downward, args=(client, upstream, state), daemon=True).start()

    def _upward(self, client: socket.socket, upstream: socket.socket, state: dict[str, Any]) -> None:
        try:
            while data := client.recv(65536):
                with self._lock:
                    if self.drop_next_response:
                        self.drop_next_response, state["drop"] = False, True
                    if self.cut_next_after is not None:
                        state["budget"], self.cut_next_after = self.cut_next_after, None
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(client, upstream)

    def _downward(self, client: socket.socket, upstream: socket.socket, state: dict[str, Any]) -> None:
        try:
            while data := upstream.recv(65536):
                if state["drop"]:
                    self.dropped += 1
                    return
                if state["budget"] is not None:
                    keep = data[: state["budget"]]
                    client.sendall(keep)
                    state["budget"] -= len(keep)
                    if state["budget"] <= 0:
                        self.cuts += 1
                        return
                    continue
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client, upstream)

    def close(self) -> None:
        self.listener.close()


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


@pytest.fixture
def proxy(live_server: LiveServer) -> Iterator[FlakyProxy]:
    port = int(live_server.url.rsplit(":", 1)[1])
    flaky = FlakyProxy(port)
    yield flaky
    flaky.close()
