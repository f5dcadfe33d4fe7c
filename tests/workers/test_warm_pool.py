"""The warm pool's bookkeeping, without Ray: which kind a process is, and when processes are started.

That a real job takes its processes from the pool is checked end to end in test_service_e2e.py.
"""

from __future__ import annotations

import json
import time

import pytest

from workers import warm_pool
from workers.conventions import RUN_ENV, TRAIN_WORKER_MARKER
from workers.warm_pool import PoolKind, WarmPool, classify, job_pool_kinds

HEAD_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "PATH": "/usr/bin",
    "MINORDPO_DATABASE_URL": "sqlite://",
}


def test_kinds_carry_ray_trains_variables_and_our_markers() -> None:
    kinds = {k.name: k for k in job_pool_kinds(HEAD_ENV, train_workers=3)}
    assert [kinds[n].target for n in ("supervisor", "channel", "fit", "controller", "train_worker")] == [
        1,
        1,
        1,
        3,
        3,
    ]
    assert kinds["channel"].serialized_runtime_env is None
    assert kinds["fit"].env_vars == RUN_ENV
    controller = kinds["controller"].env_vars
    # what Ray Train propagates from the driver's environment, plus its own default, plus the fit task's
    assert controller["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.1"
    assert "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC" in controller
    assert "PATH" not in controller and "MINORDPO_DATABASE_URL" not in controller
    assert kinds["train_worker"].env_vars == {**controller, **TRAIN_WORKER_MARKER}
    # merged runtime_envs are compact json, as the core worker writes them; the fit task's is Python's
    assert kinds["controller"].serialized_runtime_env == json.dumps(
        {"env_vars": controller}, sort_keys=True, separators=(",", ":")
    )
    assert kinds["fit"].serialized_runtime_env == '{"env_vars": {"MINORDPO_RUN": "1"}}'


def test_a_process_is_the_most_specific_kind_its_environment_holds() -> None:
    kinds = job_pool_kinds(HEAD_ENV, train_workers=2)
    by_name = {k.name: k for k in kinds}
    base = dict(HEAD_ENV)
    assert classify({**base, **by_name["train_worker"].env_vars}, kinds) == "train_worker"
    assert classify({**base, **by_name["controller"].env_vars}, kinds) == "controller"
    assert classify({**base, **RUN_ENV}, kinds) == "fit"
    assert classify({**base, **by_name["supervisor"].env_vars}, kinds) == "supervisor"
    assert classify(base, kinds) == "channel"
    assert classify(base, [k for k in kinds if k.name != "channel"]) is None


class FakeRaylet:
    """Stands in for /proc and the raylet's PrestartWorkers: a started process appears as an idle child."""

    def __init__(self, pool: WarmPool) -> None:
        self.children: dict[int, tuple[str, dict[str, str]]] = {}
        self.started: list[str] = []
        self.drop = 0  # how many of the next requests the raylet drops (its start-up concurrency was full)
        self.pool = pool

    def prestart(self, kind: PoolKind) -> None:
        self.started.append(kind.name)
        if self.drop:
            self.drop -= 1
            return
        self.children[1000 + len(self.started)] = ("ray::IDLE", {**HEAD_ENV, **kind.env_vars})


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> tuple[WarmPool, FakeRaylet]:
    pool = WarmPool(0, job_pool_kinds(HEAD_ENV, train_workers=2))
    pool._raylet_pid = 1
    raylet = FakeRaylet(pool)
    monkeypatch.setattr(warm_pool, "child_processes", lambda pid: raylet.children)
    monkeypatch.setattr(pool, "_prestart", raylet.prestart)
    return pool, raylet


def test_fill_starts_what_is_missing_and_counts_busy_processes_out(pool) -> None:
    pool, raylet = pool
    assert pool.fill() == 8
    assert sorted(raylet.started) == sorted(["channel", "controller", "controller", "controller", "fit",
                                             "supervisor", "train_worker", "train_worker"])  # fmt: skip
    assert pool.fill() == 0  # full: nothing more
    # a job takes a Train worker: its process is no longer idle, and one more is started
    pid = next(p for p, (_, env) in raylet.children.items() if env.get("MINORDPO_TRAIN_WORKER"))
    raylet.children[pid] = ("ray::RayTrainWorker", raylet.children[pid][1])
    assert pool.counts()["train_worker"] == 1
    assert pool.fill() == 1 and raylet.started[-1] == "train_worker"


def test_a_dropped_request_is_sent_again(pool, monkeypatch: pytest.MonkeyPatch) -> None:
    pool, raylet = pool
    monkeypatch.setattr(warm_pool, "APPEAR_TIMEOUT_S", 0.2)
    raylet.drop = 1
    assert pool.fill() == 8  # every kind at its target
    assert len(raylet.started) == 9  # one request more than processes
    # a raylet that starts nothing: fill gives up after a few requests instead of hanging
    raylet.drop = warm_pool.PRESTART_TRIES
    taken = next(p for p, (_, env) in raylet.children.items() if env.get("MINORDPO_TRAIN_WORKER"))
    del raylet.children[taken]
    assert pool.fill() == 0
    assert len(raylet.started) == 9 + warm_pool.PRESTART_TRIES


def test_fill_starts_nothing_while_held(pool) -> None:
    pool, raylet = pool
    assert pool.fill(hold=lambda: True) == 0
    assert raylet.started == []


def test_the_pool_holds_for_a_starting_job_and_for_busy_cores() -> None:
    asked: list[bool] = []

    def idle(cores: float):
        def measure() -> float:
            asked.append(True)
            return cores

        return measure

    assert warm_pool.should_hold([], idle(0.0)) is False  # no job: refill whatever the load
    assert asked == []  # ... without measuring it
    assert warm_pool.should_hold([0, 7], idle(2.0)) is True  # a job before its first step
    assert warm_pool.should_hold([7], idle(0.4)) is True  # jobs keep the cores busy: their steps come first
    assert warm_pool.should_hold([7], idle(1.5)) is False  # a spare core (a GPU node's CPUs, say)


def test_idle_cores_sees_a_busy_machine() -> None:
    """Every core spinning in a child process: the measure says less than one core is idle."""
    import os
    import subprocess
    import sys

    cores = os.cpu_count() or 1
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.3)
        assert warm_pool.idle_cores(0.5) < warm_pool.IDLE_CORES_TO_REFILL
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()
    assert 0.0 <= warm_pool.idle_cores(0.2) <= cores
