"""A local Ray head killed under a running server: the server starts a new one, /readyz answers again, and
the job that was running resumes from its checkpoint instead of staying `running`."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import httpx
import pytest

from tests.serving import pid_alive
from tests.workers.service_helpers import TERMINAL, Server, job_body, metric_steps, submit, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_killed_head_is_replaced_and_its_job_resumes(tmp_path, tiny_model_dir, learnable_pairs_file):
    # two API worker processes: their /readyz asks Ray at the address the server gave them at start-up
    server = Server(
        tmp_path,
        tiny_model_dir,
        learnable_pairs_file,
        MINORDPO_API_WORKERS="2",
        MINORDPO_RAY_WARM_WORKERS="0",
    )
    server.start()
    new_head = None
    try:
        job_id = submit(server, job_body(tiny_model_dir, learnable_pairs_file, steps=12, max_retries=1))
        wait_for(server, job_id, lambda j: (j["progress"]["step"] or 0) >= 4)  # past its checkpoint at 3
        old_head = server.head_pid()
        assert old_head is not None
        os.killpg(old_head, signal.SIGKILL)  # `ray start`, GCS, raylet, dashboard: no clean-up of theirs

        deadline = time.monotonic() + 120
        while (new_head := server.head_pid()) in (None, old_head) or not _ready(server):
            assert time.monotonic() < deadline, (
                f"no new head: {(server.root / 'serve.log').read_text()[-3000:]}"
            )
            time.sleep(0.5)
        assert pid_alive(new_head)

        job = wait_for(server, job_id, lambda j: j["status"] in TERMINAL, timeout=300)
        events = httpx.get(
            f"{server.url}/v1/jobs/{job_id}/events", headers={"Accept": "application/json"}, timeout=10
        ).json()["data"]
        assert job["status"] == "succeeded", (job.get("error"), [e["message"] for e in events])
        assert any(e["kind"] == "retry" for e in events), [e["message"] for e in events]
        assert metric_steps(server, job_id) == list(range(1, 13))  # resumed: no step lost, none twice
    finally:
        server.stop()
        if new_head is not None:
            deadline = time.monotonic() + 60
            while pid_alive(new_head) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not pid_alive(new_head), "the replacement head outlived the server"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(new_head, signal.SIGKILL)


def _ready(server: Server) -> bool:
    try:
        return httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False
