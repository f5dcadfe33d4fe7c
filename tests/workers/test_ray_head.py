"""Starting our local Ray head: its ports, a start that fails and is retried, a bounded reachability probe,
every listener on loopback, and a draining head that nobody adopts."""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

from workers import ray_compat, ray_head
from workers.ports import RAY_WORKER_PORTS_END, ephemeral_port_range, listen_ports
from workers.ray_head import start_local_head, stop_local_head
from workers.ray_jobs_client import RayJobs, RayUnavailableError, jobs_api_reachable


def listening(pid: int) -> list[tuple[str, str, int]]:
    """(process name, address, port) of each listening TCP socket of `pid` and of every process under it."""
    root = psutil.Process(pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            found += [
                (proc.name(), c.laddr.ip, c.laddr.port)
                for c in proc.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            ]
        except psutil.Error:  # a worker process that ended meanwhile
            continue
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1, as gRPC binds 127.0.0.1 on a dual-stack socket
    return address.is_loopback


def test_head_ports_are_distinct_free_and_outside_the_ranges_others_take_ports_from() -> None:
    ephemeral_low, _ = ephemeral_port_range()
    ports = listen_ports(len(ray_head.HEAD_LISTENERS))
    assert len(set(ports)) == len(ray_head.HEAD_LISTENERS)
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
            ports[ray_head.HEAD_LISTENERS.index("dashboard-port")] = taken.getsockname()[1]
        picks.append(ports)
        return ports

    real_listen_ports = ray_head.listen_ports
    monkeypatch.setattr(ray_head, "listen_ports", dashboard_port_taken_on_the_first_pick)
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
            dashboard = picks[1][ray_head.HEAD_LISTENERS.index("dashboard-port")]
            assert head.dashboard_url == f"http://127.0.0.1:{dashboard}" and head.alive()
            assert state.exists()
            assert (
                "already occupied" in state.with_suffix(".log").read_text()
            )  # the first try's output is kept

            # every listener of the head (GCS, raylet, dashboard, its agents, the client server) is on loopback
            expected = set(picks[1])
            deadline = time.monotonic() + 60
            while not expected <= {port for _, _, port in listening(head.pid)}:
                assert time.monotonic() < deadline, (
                    f"listeners {listening(head.pid)}; expected ports {expected}"
                )
                time.sleep(0.5)
            sockets = listening(head.pid)
            assert [s for s in sockets if not is_loopback(s[1])] == [], sockets

            # a draining head is not adopted: a server that reads its state file meanwhile starts its own
            stopper = threading.Thread(target=stop_local_head, args=(head, state))
            stopper.start()
            deadline = time.monotonic() + 10
            while not (state.exists() and json.loads(state.read_text()).get("stopping")):
                assert time.monotonic() < deadline, "the state file was not marked stopping"
                time.sleep(0.01)
            other = start_local_head(state, num_cpus=1, preload=False, attempts=1)
            try:
                assert other.pid != head.pid and other.alive()
                stopper.join(60)
                assert json.loads(state.read_text())["pid"] == other.pid, (
                    "the old head's stop kept the new record"
                )
            finally:
                stop_local_head(other, state)
        finally:
            stop_local_head(head, state)
    finally:
        taken.close()


def test_each_local_head_has_its_own_ray_temp_root_unless_the_operator_set_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    first, second = (ray_head.head_temp_root(tmp_path / name / "ray-head.json") for name in ("a", "b"))
    assert first != second
    assert first == ray_head.head_temp_root(tmp_path / "a" / "ray-head.json")  # a restart finds the same one
    assert (
        len(str(first / "ray" / "session_2026-12-07_04-35-40_123456_12345" / "sockets" / "plasma_store"))
        < 107
    )
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "operator"))
    assert ray_head.head_temp_root(tmp_path / "a" / "ray-head.json") == tmp_path / "operator"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.usefixtures("own_ray_token")
def test_the_cluster_size_reads_the_same_on_the_tested_rays_path_and_the_public_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "ray-head.json"
    head = start_local_head(state, num_cpus=1, preload=False)
    try:
        # the head tells its job supervisor its own address, not that of whichever head started last
        address_file = ray_head.head_temp_root(state) / "ray" / "ray_current_cluster"
        assert address_file.read_text().strip() == head.gcs_address
        jobs = RayJobs(head.dashboard_url)
        deadline = time.monotonic() + 30
        while True:  # the node registers its resources shortly after the Jobs API answers
            try:
                tested = jobs.cluster_resources()
                break
            except RayUnavailableError:
                assert time.monotonic() < deadline, "the cluster status never showed the node's CPUs"
                time.sleep(0.5)
        monkeypatch.setattr(ray_compat, "supported", lambda: False)  # what an untested Ray reads instead
        public = jobs.cluster_resources()
    finally:
        stop_local_head(head, state)
    assert tested == public == {"CPU": 1.0, "GPU": 0.0}
