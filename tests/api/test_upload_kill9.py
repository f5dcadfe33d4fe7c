"""Fault: a live server killed with SIGKILL in the middle of a dataset upload leaves nothing once it restarts."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import text

from core.store import Database, upgrade
from tests.serving import api_only_env, free_port, wait_until_up

TOKEN = "tok-kill9-3c7e1a"
ROW = b'{"prompt": "Is the sky blue?", "chosen": " Yes.", "rejected": " No."}\n'


def serve(root: Path, db_url: str, port: int) -> subprocess.Popen[bytes]:
    env = api_only_env(db_url, root, f"team-k:{TOKEN}", port)
    log = (root / "serve.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve"], cwd=root, env=env, stdout=log, stderr=log
    )
    wait_until_up(proc, f"http://127.0.0.1:{port}/readyz", log=(root / "serve.log").read_text)
    return proc


def test_kill9_mid_upload_then_restart_leaves_no_file_and_no_row(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'server.db'}"
    upgrade(db_url)
    port = free_port()
    proc = serve(tmp_path, db_url, port)
    datasets = tmp_path / "artifacts" / "datasets"
    try:
        # a raw-body upload that announces 8 MB and sends 1 MB, then waits: the server is mid-upload
        body = ROW * (1024 * 1024 // len(ROW))
        head = (
            f"POST /v1/datasets?filename=big.jsonl HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/x-ndjson\r\n"
            f"Content-Length: {8 * len(body)}\r\n\r\n"
        ).encode()
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(head + body)
        deadline = time.monotonic() + 20
        while not list(datasets.glob(".upload-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        partial = list(datasets.glob(".upload-*"))
        assert partial, "the server never started writing the upload"
        proc.kill()  # SIGKILL: no clean-up runs
        proc.wait(10)
        client.close()
        assert all(p.exists() for p in partial)  # what the killed server left
    finally:
        if proc.poll() is None:
            proc.kill()
    proc = serve(tmp_path, db_url, port)
    try:
        assert not list(datasets.glob(".upload-*")), "the restarted server kept the killed upload's file"
        assert [p.name for p in datasets.iterdir()] == []  # nothing stored either
        database = Database(db_url)
        try:
            with database.engine.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM datasets")).scalar_one() == 0
        finally:
            database.dispose()
        # and the service takes the same upload whole afterwards
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/datasets?filename=small.jsonl",
            content=ROW * 4,
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
        assert r.status_code == 201, r.text
    finally:
        proc.terminate()
        proc.wait(30)
