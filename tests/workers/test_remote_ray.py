"""The production layout on an existing cluster: `minordpo serve` (API only) + `minordpo dispatcher` + `RAY_ADDRESS`.

The dispatcher joins the cluster's Jobs API (token auth on), runs a job there, sizes admission from
the cluster's CPUs, and leaves the cluster running when it stops.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving import pid_alive
from tests.workers.service_helpers import TERMINAL, Server, job_body, metric_steps, submit, wait_for
from workers.ray_head import start_local_head, stop_local_head

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_job_runs_on_an_existing_cluster_given_by_ray_address(
    tmp_path: Path, tiny_model_dir: Path, learnable_pairs_file: Path, own_ray_token: Path
) -> None:
    # "someone else's" cluster: its own folder, its own token (the operator hands the token to the service)
    token = own_ray_token
    cluster = tmp_path / "cluster"
    cluster.mkdir()
    head = start_local_head(cluster / "ray-head.json", num_cpus=2)
    server = Server(
        tmp_path / "service", tiny_model_dir, learnable_pairs_file, RAY_ADDRESS=head.dashboard_url,
        RAY_AUTH_TOKEN_PATH=str(token), MINORDPO_EMBEDDED_DISPATCHER="false",
    )  # fmt: skip
    (tmp_path / "service").mkdir()
    dispatcher: subprocess.Popen[bytes] | None = None
    try:
        server.start()
        log = (server.root / "dispatcher.log").open("wb")
        dispatcher = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "dispatcher"],
            cwd=server.root,
            env=server.env,
            stdout=log,
            stderr=log,
        )
        assert not (server.root / "var" / "ray-head.json").exists(), "no local head when RAY_ADDRESS is set"
        job_id = submit(server, job_body(tiny_model_dir, learnable_pairs_file, steps=3))
        job = wait_for(server, job_id, lambda j: j["status"] in TERMINAL)
        assert job["status"] == "succeeded", job.get("error")
        assert metric_steps(server, job_id) == [1, 2, 3]
        too_big = submit(server, job_body(tiny_model_dir, learnable_pairs_file, num_workers=3))
        failed = wait_for(server, too_big, lambda j: j["status"] in TERMINAL, timeout=30)
        assert failed["error"]["code"] == "insufficient_resources"  # sized from the remote cluster's CPUs
        dispatcher.send_signal(signal.SIGTERM)
        assert dispatcher.wait(60) == 0, (server.root / "dispatcher.log").read_text()[-2000:]
        server.stop()
        assert pid_alive(head.pid), "neither process may stop a cluster it did not start"
    finally:
        if dispatcher is not None and dispatcher.poll() is None:
            dispatcher.kill()
        server.stop()
        stop_local_head(head, cluster / "ray-head.json")
