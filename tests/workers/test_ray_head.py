"""Starting our local Ray head: its ports, a start that fails and is retried, and a bounded reachability probe."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from workers import ray_control
from workers.ports import RAY_WORKER_PORTS_END, ephemeral_port_range, listen_ports
from workers.ray_control import (
    RayJobs,
    RayUnavailableError,
    jobs_api_reachable,
    start_local_head,
    stop_local_head,
)


def test_head_ports_are_distinct_free_and_outside_the_ranges_others_take_ports_from() -> None:
    ephemeral_low, _ = ephemeral_port_range()
    ports = listen_ports(len(ray_control.HEAD_LISTENERS))
    assert len(set(ports)) == len(ray_control.HEAD_LISTENERS)
    # an outgoing connection takes its local port from the ephemeral range; Ray's workers bind 10002-19999
    assert all(RAY_WORKER_PORTS_END < port < ephemeral_low for port in ports), ports
    for port in ports:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


def test_a_jobs_api_that_never_answers_is_unreachable_not_a_hang() -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        assert not jobs_api_reachable(url, timeout_s=0.5)  # what /readyz and the head's start loop ask
        with pytest.raises(RayUnavailableError, match=f"cannot reach Ray's Jobs API at {url}"):
            RayJobs(url, timeout_s=0.5)  # what the dispatcher submits and watches through
        assert time.monotonic() - started < 10


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("own_ray_token")
def test_a_head_start_that_fails_is_retried_on_new_ports_and_the_error_quotes_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = socket.socket()  # bound, not listening: what an outgoing connection's local port looks like
    taken.bind(("127.0.0.1", 0))
    picks: list[list[int]] = []

    def dashboard_port_taken_on_the_first_pick(count: int) -> list[int]:
        ports = real_listen_ports(count)
        if not picks:
            ports[ray_control.HEAD_LISTENERS.index("dashboard-port")] = taken.getsockname()[1]
        picks.append(ports)
        return ports

    real_listen_ports = ray_control.listen_ports
    monkeypatch.setattr(ray_control, "listen_ports", dashboard_port_taken_on_the_first_pick)
    try:
        with pytest.raises(RayUnavailableError, match="already occupied") as refused:
            start_local_head(tmp_path / "once" / "ray-head.json", num_cpus=1, preload=False, attempts=1)
        assert "exited with 1" in str(refused.value)
        assert not (tmp_path / "once" / "ray-head.json").exists()

        picks.clear()
        state = tmp_path / "twice" / "ray-head.json"
        head = start_local_head(state, num_cpus=1, preload=False, attempts=2)
        try:
            assert len(picks) == 2, "one failed start, then one on new ports"
            dashboard = picks[1][ray_control.HEAD_LISTENERS.index("dashboard-port")]
            assert head.dashboard_url == f"http://127.0.0.1:{dashboard}" and head.alive()
            assert state.exists()
            assert (
                "already occupied" in state.with_suffix(".log").read_text()
            )  # the first try's output is kept
        finally:
            stop_local_head(head, state)
    finally:
        taken.close()
