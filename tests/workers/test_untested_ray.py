"""The service on a Ray outside the tested range (simulated): it says so once, keeps no warm pool, and a job still succeeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.workers.service_helpers import TERMINAL, Server, job_body, metric_steps, submit, wait_for
from workers.ray_compat import VERSION_ENV
from workers.warm_pool import raylet_pid

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_on_an_untested_ray_a_job_runs_without_the_warm_pool(
    tmp_path: Path, tiny_model_dir: Path, learnable_pairs_file: Path
) -> None:
    server = Server(tmp_path, tiny_model_dir, learnable_pairs_file, **{VERSION_ENV: "2.99.0"})
    server.start()
    try:
        job_id = submit(server, job_body(tiny_model_dir, learnable_pairs_file, steps=3))
        job = wait_for(server, job_id, lambda j: j["status"] in TERMINAL)
        assert job["status"] == "succeeded", job.get("error")
        assert metric_steps(server, job_id) == [1, 2, 3]
        head = json.loads((tmp_path / "var" / "ray-head.json").read_text())
        raylet = raylet_pid(head["node_manager_port"])
        assert raylet is not None
        environ = Path(f"/proc/{raylet}/environ").read_bytes().split(b"\0")
        assert not any(item.startswith(b"RAY_preload_python_modules=") for item in environ)
    finally:
        server.stop()
    log = (tmp_path / "serve.log").read_text()
    assert log.count("is outside the tested range") == 1, log[-3000:]
    assert "Ray 2.99.0 is outside the tested range (>=2.60,<2.61)" in log
    assert "warm pool: started" not in log
