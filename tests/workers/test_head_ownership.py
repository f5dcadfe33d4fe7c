"""Which local Ray head a server takes, without Ray: its own state file, never a stopping head or another
running server's, leftovers of a dead head killed; a dead head replaced under a running dispatcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from core.settings import Settings
from core.store import Database, claim_queued, create_job, get_job, list_events, set_ray_submission, upgrade
from tests.serving import pid_alive
from workers import ray_head
from workers.head_state import HEAD_MARKER, process_started
from workers.ray_head import LocalHead, start_local_head, stop_local_head


class Spawned(Exception):
    """Raised instead of starting a real head: the server chose a new head over the recorded one."""


@pytest.fixture
def no_new_head(monkeypatch: pytest.MonkeyPatch) -> list[dict | None]:
    """`ray start` replaced by a recorder of the ports it was asked for; Ray's token left as it is."""
    asked: list[dict | None] = []

    def spawn(cpus: int, preload: bool, log_path: Path, temp_root: Path, ports: dict | None = None) -> None:
        asked.append(ports)
        raise Spawned

    monkeypatch.setattr(ray_head, "_spawn_head", spawn)
    monkeypatch.setattr(ray_head, "ensure_auth_token", lambda folder: None)
    monkeypatch.setattr(ray_head, "jobs_api_reachable", lambda url, timeout_s=5.0: True)
    return asked


@pytest.fixture
def running_head(tmp_path: Path) -> Iterator[LocalHead]:
    """A head whose `ray start` process runs (a sleeper) and whose GCS port accepts connections."""
    gcs = socket.socket()
    gcs.bind(("127.0.0.1", 0))
    gcs.listen()
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    ports = {name: 20000 + i for i, name in enumerate(ray_head.HEAD_LISTENERS)}
    yield LocalHead(f"127.0.0.1:{gcs.getsockname()[1]}", "http://127.0.0.1:1", proc.pid, 2, 1, ports)
    proc.kill()
    proc.wait()
    gcs.close()


def record(path: Path, head: LocalHead, **fields: object) -> None:
    path.write_text(json.dumps({**asdict(head), **fields}), encoding="utf-8")


def test_each_server_records_its_head_under_its_own_artifacts_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MINORDPO_RAY_STATE_FILE", raising=False)
    monkeypatch.delenv("MINORDPO_ARTIFACTS_DIR", raising=False)
    a = Settings(artifacts_dir=tmp_path / "a" / "artifacts")
    b = Settings(artifacts_dir=tmp_path / "b" / "artifacts")
    assert a.ray_state_file == tmp_path / "a" / "artifacts" / "ray-head.json"
    assert b.ray_state_file == tmp_path / "b" / "artifacts" / "ray-head.json"
    monkeypatch.setenv("MINORDPO_ARTIFACTS_DIR", str(tmp_path / "c"))
    assert Settings().ray_state_file == tmp_path / "c" / "ray-head.json"
    monkeypatch.setenv("MINORDPO_RAY_STATE_FILE", str(tmp_path / "elsewhere.json"))
    assert Settings().ray_state_file == tmp_path / "elsewhere.json"  # still the operator's to choose


def test_a_head_that_is_stopping_is_not_adopted(tmp_path: Path, running_head: LocalHead, no_new_head) -> None:
    state = tmp_path / "ray-head.json"
    record(state, running_head, stopping=True)
    with pytest.raises(Spawned):
        start_local_head(state)
    assert pid_alive(running_head.pid), "a draining head is its owner's to stop"


def test_a_head_another_running_server_owns_is_not_adopted(
    tmp_path: Path, running_head: LocalHead, no_new_head
) -> None:
    other = subprocess.Popen(["sleep", "300"])
    try:
        state = tmp_path / "ray-head.json"
        record(state, running_head, owner_pid=other.pid, owner_started=process_started(other.pid))
        with pytest.raises(Spawned):
            start_local_head(state)
        assert pid_alive(running_head.pid)
    finally:
        other.kill()
        other.wait()


def test_the_head_of_a_killed_server_is_adopted_and_owned_from_then_on(
    tmp_path: Path, running_head: LocalHead, no_new_head
) -> None:
    killed = subprocess.Popen(["sleep", "300"])
    started = process_started(killed.pid)
    killed.kill()
    killed.wait()
    state = tmp_path / "ray-head.json"
    record(state, running_head, owner_pid=killed.pid, owner_started=started)
    head = start_local_head(state)
    assert head.pid == running_head.pid and no_new_head == []
    recorded = json.loads(state.read_text())
    assert recorded["owner_pid"] == os.getpid() and recorded["owner_started"] == process_started(os.getpid())


def test_a_dead_heads_leftovers_are_killed_and_its_ports_tried_first(tmp_path: Path, no_new_head) -> None:
    # `ray start` gone (exited), one of its processes (a GCS, a raylet) left in its process group
    leader = subprocess.Popen(
        ["bash", "-c", "sleep 300 & echo $!"], stdout=subprocess.PIPE, start_new_session=True, text=True
    )
    leftover = int(leader.stdout.readline())
    leader.wait()
    # a job driver (a session of its own) of that head, and a process of another head
    driver = subprocess.Popen(["sleep", "300"], env={**os.environ, HEAD_MARKER: "h1"}, start_new_session=True)
    bystander = subprocess.Popen(
        ["sleep", "300"], env={**os.environ, HEAD_MARKER: "h2"}, start_new_session=True
    )
    try:
        ports = {name: 21000 + i for i, name in enumerate(ray_head.HEAD_LISTENERS)}
        state = tmp_path / "ray-head.json"
        dead = LocalHead("127.0.0.1:1", "http://127.0.0.1:1", leader.pid, 2, 1, ports, head_id="h1")
        record(state, dead)
        with pytest.raises(Spawned):
            start_local_head(state, ports=ports)
        deadline = time.monotonic() + 5
        while pid_alive(leftover) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(leftover), "what was left of the dead head still runs"
        assert driver.wait(5) == -9
        assert bystander.poll() is None, "a process of another head was killed"
        assert no_new_head == [ports]
    finally:
        for proc in (driver, bystander):
            proc.kill()
            proc.wait()


def test_stop_marks_the_head_stopping_before_it_is_signalled(tmp_path: Path) -> None:
    state = tmp_path / "ray-head.json"
    seen = tmp_path / "seen.json"
    sees_state_on_sigterm = (
        "import signal, shutil, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *_: (shutil.copy({str(state)!r}, {str(seen)!r}), sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    head_proc = subprocess.Popen(
        [sys.executable, "-c", sees_state_on_sigterm], stdout=subprocess.PIPE, text=True
    )
    assert head_proc.stdout.readline().strip() == "ready"
    head = LocalHead("127.0.0.1:1", "http://127.0.0.1:1", head_proc.pid, 2)
    record(state, head)
    stop_local_head(head, state)
    assert json.loads(seen.read_text())["stopping"] is True
    assert not state.exists()
    # a state file that records another head (one a server sharing the file started since) is left alone
    other = LocalHead("127.0.0.1:1", "http://127.0.0.1:1", head_proc.pid + 100_000, 2)
    record(state, other)
    stop_local_head(head, state)
    assert json.loads(state.read_text())["pid"] == other.pid


class LostRayJobs:
    """A cluster that knows no job (a new head), recording what is submitted to it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.submitted: list[str] = []

    def submit(self, submission_id: str, entrypoint: list[str]) -> None:
        self.submitted.append(submission_id)

    def status(self, submission_id: str) -> str | None:
        return None


def test_a_dead_head_is_replaced_and_its_running_job_resubmitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers import service as service_module
    from workers.dispatcher import Dispatcher, DriverEnv
    from workers.service import DispatcherService

    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    db = Database(url)
    settings = Settings(database_url=url, artifacts_dir=tmp_path / "artifacts", ray_warm_workers=0)
    ports = {name: 22000 + i for i, name in enumerate(ray_head.HEAD_LISTENERS)}
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = LocalHead("127.0.0.1:1", "http://127.0.0.1:11", gone.pid, 2, 1, ports)
    new = LocalHead("127.0.0.1:2", "http://127.0.0.1:12", os.getpid(), 2, 1, ports)
    started: list[dict | None] = []

    def start_head(state_file: Path, **kwargs: object) -> LocalHead:
        started.append(kwargs.get("ports"))  # type: ignore[arg-type]
        return new

    monkeypatch.setattr(service_module, "start_local_head", start_head)
    monkeypatch.setattr(service_module, "RayJobs", LostRayJobs)
    monkeypatch.setattr(LocalHead, "running", lambda self: self.pid != gone.pid)
    service = DispatcherService(settings, db)
    service.head, service.ray_jobs = dead, LostRayJobs(dead.dashboard_url)
    with db.write() as s:
        job, _ = create_job(s, project="p", spec={
            "name": "q", "model": "m", "dataset": {"train": "d.jsonl"},
            "resources": {"num_workers": 2, "cpus_per_worker": 1, "max_retries": 1},
        })  # fmt: skip
    with db.write() as s:  # running on the dead head: claimed and accepted by its Ray
        claim_queued(s, 1, "w")
        set_ray_submission(s, job.id, job.id)
    dispatcher = Dispatcher(
        db, service.ray_jobs, capacity=lambda: {"CPU": 2.0, "GPU": 0.0}, max_concurrent=1,
        driver_env=DriverEnv.from_settings(settings), ray_source=service.current_ray_jobs,
    )  # fmt: skip
    dispatcher.tick()
    assert started == [ports], "a new head, on the dead one's ports first"
    assert service.head is new and service.ray_jobs.address == new.dashboard_url
    assert dispatcher.ray.submitted == [job.id], "the job was resubmitted to the new head"
    with db.read() as s:
        fresh = get_job(s, job.id)
        kinds = [e.kind for e in list_events(s, job.id)]
    assert fresh is not None and fresh.status == "running" and fresh.attempt == 2
    assert "retry" in kinds
    db.dispose()


def test_api_workers_ask_the_head_recorded_now(tmp_path: Path) -> None:
    from cli.api_processes import local_head_url

    settings = Settings(artifacts_dir=tmp_path, ray_state_file=tmp_path / "ray-head.json")
    assert local_head_url(settings) is None  # no head recorded: the address given at start-up
    replacement = LocalHead("127.0.0.1:2", "http://127.0.0.1:23456", os.getpid(), 2)
    record(settings.ray_state_file, replacement)  # a new head, on other ports than the dead one's
    assert local_head_url(settings) == "http://127.0.0.1:23456"
    remote = Settings(
        artifacts_dir=tmp_path, ray_state_file=settings.ray_state_file, ray_address="http://r:8265"
    )
    assert local_head_url(remote) is None  # a cluster joined through RAY_ADDRESS has no local head


def test_a_busy_gcs_is_not_taken_for_a_dead_head_until_it_misses_in_a_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.service import DispatcherService

    settings = Settings(artifacts_dir=tmp_path / "artifacts", ray_warm_workers=0)
    busy = LocalHead("127.0.0.1:1", "http://127.0.0.1:11", os.getpid(), 2, 1, {})  # its process runs
    replaced: list[LocalHead] = []
    service = DispatcherService(settings, None)  # type: ignore[arg-type]
    service.head, service.ray_jobs = busy, LostRayJobs(busy.dashboard_url)
    monkeypatch.setattr(service, "_replace_head", replaced.append)
    answers = iter([False, False, True, False, False, False])  # the GCS connection, check by check
    monkeypatch.setattr(LocalHead, "running", lambda self: next(answers))
    for check in range(1, 7):
        service._next_head_check = 0.0
        service.current_ray_jobs()
        assert len(replaced) == (1 if check == 6 else 0), f"check {check}"
