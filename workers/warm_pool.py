"""Warm Ray worker processes for our local head: started ahead of jobs, with torch and the training code imported.

A job asks Ray for about eight processes (the Jobs API's supervisor, our mailbox actor, Ray Train's
controller, synchronization actor and placement-group cleaner, one process per Train worker). Started
cold, each imports Ray, torch and, for a Train worker, transformers: most of the time from POST to the
first step on a small machine. The raylet can start idle workers ahead of time and keep them alive
(its `PrestartWorkers` call), and hands one to the next actor whose runtime_env string is the same
(it matches a hash of the string, byte for byte); `RAY_preload_python_modules=workers.preload` makes
each import what it will need while it idles. This module keeps a few such processes ready for each
runtime_env a job's actors use, and starts more as jobs take them. Both the prestart call and the
strings below rest on Ray's private names (workers.ray_compat): on an untested Ray the service keeps
no pool.

The strings, as the tested Ray writes them (tests/workers/test_warm_pool.py checks a real job takes the pool):
- the supervisor: the Jobs API's own runtime_env for it (`_get_supervisor_runtime_env`);
- our channel, made by the driver: none, since jobs are submitted without one;
- the task that runs fit() (workers/job_run.py): `{"env_vars": RUN_ENV}`, as Python's json writes it;
- Ray Train's controller, and the actors it starts: what Ray Train propagates to it (V:
  `get_env_vars_to_propagate`, plus its default for RAY_WARN_BLOCKING_GET_INSIDE_ASYNC) merged with
  the task's RUN_ENV, which the core worker writes as compact json;
- Train workers: the same plus TRAIN_WORKER_MARKER.
Each kind's variables are also how a process is told apart (`classify`), and what workers.preload
reads to import what that process will need.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from workers import ray_compat
from workers.conventions import RUN_ENV, TRAIN_WORKER_MARKER

log = logging.getLogger("workers.warm_pool")

KEEP_ALIVE_S = 3600
"""How long the raylet keeps a warm process it started for us, idle; we start another after that."""
APPEAR_TIMEOUT_S = 5.0
"""How long a requested process may take to show up before the request is sent again: the raylet drops
a prestart request, silently, when `maximum_startup_concurrency` (its CPU count) processes are starting."""
PRESTART_TRIES = 3
IDLE_CORES_TO_REFILL = 1.0
"""While jobs run, the pool starts a process only when this machine left at least this many cores idle:
a starting process imports for seconds on one core, and on a machine the jobs keep busy that core
would come out of their steps (measured in bench/README.md)."""


@dataclass(frozen=True)
class PoolKind:
    """Processes of one runtime_env: its exact serialized string (None: no runtime_env) and how many to keep."""

    name: str
    serialized_runtime_env: str | None
    target: int

    @cached_property
    def env_vars(self) -> dict[str, str]:
        if self.serialized_runtime_env is None:
            return {}
        return dict(json.loads(self.serialized_runtime_env).get("env_vars") or {})


def job_pool_kinds(head_env: Mapping[str, str], train_workers: int) -> list[PoolKind]:
    """What one job with `train_workers` Train workers takes, for drivers whose environment is `head_env`."""
    env_vars = {**ray_compat.train_env_vars(head_env), **RUN_ENV}
    worker_vars = {**env_vars, **TRAIN_WORKER_MARKER}
    return [
        PoolKind("supervisor", ray_compat.supervisor_runtime_env(), 1),
        PoolKind("channel", None, 1),
        PoolKind("fit", json.dumps({"env_vars": RUN_ENV}), 1),
        PoolKind("controller", _compact({"env_vars": env_vars}), 3),
        PoolKind("train_worker", _compact({"env_vars": worker_vars}), train_workers),
    ]


def _compact(runtime_env: dict[str, object]) -> str:
    """A runtime_env as the core worker writes one it merged with its parent's: compact, sorted json."""
    return json.dumps(runtime_env, sort_keys=True, separators=(",", ":"))


def child_processes(pid: int) -> dict[int, tuple[str, dict[str, str]]]:
    """Direct children of `pid`: their process titles and environments (Linux /proc)."""
    out: dict[int, tuple[str, dict[str, str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            pairs = (item.partition(b"=") for item in (entry / "environ").read_bytes().split(b"\0") if item)
            out[int(entry.name)] = (
                title,
                {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs},
            )
        except (OSError, ValueError, IndexError):
            continue
    return out


def raylet_pid(node_manager_port: int) -> int | None:
    """The pid of the raylet listening on `node_manager_port` on this machine."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            argv
            and argv[0].endswith(b"/raylet")
            and f"--node_manager_port={node_manager_port}".encode() in argv
        ):
            return int(entry.name)
    return None


def _starting_or_idle(title: str) -> bool:
    """A worker process still importing (its command line) or idle (the title Ray gives it once registered)."""
    return title == "ray::IDLE" or "default_worker.py" in title


def busy_and_total_ticks() -> tuple[int, int]:
    """This machine's busy and total CPU time since boot, in clock ticks, all cores (Linux /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def idle_cores(window_s: float = 0.5) -> float:
    """How many of this machine's cores stayed idle, on average, over the next `window_s` seconds."""
    busy0, total0 = busy_and_total_ticks()
    time.sleep(window_s)
    busy1, total1 = busy_and_total_ticks()
    if total1 <= total0:
        return float(os.cpu_count() or 1)
    return (1.0 - (busy1 - busy0) / (total1 - total0)) * (os.cpu_count() or 1)


def should_hold(running_job_steps: list[int], idle: Callable[[], float]) -> bool:
    """Whether the pool waits: while a job is between its POST and its first step (the CPU a starting
    process takes would come out of that start), and while jobs run on a machine with less than
    IDLE_CORES_TO_REFILL cores idle (it would come out of their steps). `idle` is asked only then."""
    if any(step == 0 for step in running_job_steps):
        return True
    return bool(running_job_steps) and idle() < IDLE_CORES_TO_REFILL


def classify(environ: Mapping[str, str], kinds: list[PoolKind]) -> str | None:
    """The kind whose env_vars the process environment holds, the most specific one; None if none does."""
    best: PoolKind | None = None
    for kind in kinds:
        wanted = kind.env_vars
        if all(environ.get(k) == v for k, v in wanted.items()) and (
            best is None or len(wanted) > len(best.env_vars)
        ):
            best = kind
    return best.name if best else None


class WarmPool:
    """Keeps `kinds` of warm processes on one raylet; `fill()` is one pass, `run()` the loop.

    A warm process is told apart by its environment (the runtime_env's env_vars are set in it), so a
    restarted server counts the processes an earlier one started instead of starting more.
    """

    def __init__(self, node_manager_port: int, kinds: list[PoolKind]) -> None:
        self.raylet_address = f"127.0.0.1:{node_manager_port}"
        self.node_manager_port = node_manager_port
        self.kinds = sorted(kinds, key=lambda kind: kind.name)
        self._raylet_pid: int | None = None
        self._raylet = ray_compat.RayletPrestarter(self.raylet_address)

    @property
    def raylet_pid(self) -> int:
        """The raylet's pid (it may start after the head's Jobs API answers, so looked up on first use)."""
        if self._raylet_pid is None:
            self._raylet_pid = raylet_pid(self.node_manager_port)
            if self._raylet_pid is None:
                raise LookupError(f"no raylet listens on port {self.node_manager_port} on this machine")
        return self._raylet_pid

    def _prestart(self, kind: PoolKind) -> None:
        self._raylet.prestart(kind.serialized_runtime_env, KEEP_ALIVE_S)

    def counts(self) -> dict[str, int]:
        """Warm processes of each kind that no actor has taken yet (starting or idle)."""
        counts = {kind.name: 0 for kind in self.kinds}
        for title, environ in child_processes(self.raylet_pid).values():
            name = classify(environ, self.kinds) if _starting_or_idle(title) else None
            if name is not None:
                counts[name] += 1
        return counts

    def fill(self, stop: threading.Event | None = None, hold: Callable[[], bool] = lambda: False) -> int:
        """Start the processes missing, one at a time, each once the last is seen; returns how many.

        Stops early when `stop` is set or `hold()` says so (the service holds while a job is starting).
        """
        started = 0
        for kind in self.kinds:
            have = self.counts()[kind.name]
            while have < kind.target:
                if (stop is not None and stop.is_set()) or hold():
                    return started
                if not self._start_one(kind, have):
                    log.warning(
                        "warm pool: the raylet started no %s process for %d requests",
                        kind.name,
                        PRESTART_TRIES,
                    )
                    return started
                have += 1
                started += 1
        return started

    def _start_one(self, kind: PoolKind, have: int) -> bool:
        """Ask for one process of `kind` once no other is registering (so the request is not dropped)."""
        for _ in range(PRESTART_TRIES):
            self._await(
                lambda: (
                    not any(
                        "default_worker.py" in title for title, _ in child_processes(self.raylet_pid).values()
                    )
                )
            )
            self._prestart(kind)
            if self._await(lambda: self.counts()[kind.name] > have):
                return True
        return False

    @staticmethod
    def _await(condition: Callable[[], bool], timeout_s: float | None = None) -> bool:
        deadline = time.monotonic() + (APPEAR_TIMEOUT_S if timeout_s is None else timeout_s)
        while not condition():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def run(
        self, stop: threading.Event, interval_s: float = 1.0, hold: Callable[[], bool] = lambda: False
    ) -> None:
        """Top the pool up every `interval_s` until `stop` is set, except while `hold()` (errors are logged)."""
        while not stop.is_set():
            try:
                started = self.fill(stop, hold)
                if started:
                    log.info("warm pool: started %d process(es); now %s", started, self.counts())
            except LookupError as exc:  # the raylet not up yet, or gone with the head
                log.info("warm pool: %s", exc)
                stop.wait(5)
            except Exception:  # noqa: BLE001 - a pool that cannot fill only makes jobs start cold
                log.exception("warm pool: topping up failed")
                stop.wait(30)
            stop.wait(interval_s)
