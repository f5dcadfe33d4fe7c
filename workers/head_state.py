"""Process-level facts about our local Ray head: is a process running, which one it is, does a port answer; its state file."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import psutil

HEAD_MARKER = "MINORDPO_RAY_HEAD"
"""Set, to the head's id, in the environment of our head's `ray start`: every process of that head inherits
it (GCS, raylet, workers in process groups of their own, job drivers in sessions of their own)."""


def process_running(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: our own dead child is reaped here, anyone else's is only seen)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:  # not our child
        pass
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def process_started(pid: int) -> float | None:
    """When `pid` started (seconds since the epoch): with the pid, it names one process, not a reused pid."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def same_process_running(pid: int | None, started: float | None) -> bool:
    """Whether the process recorded as (`pid`, `started`) still runs (a pid reused since is another process)."""
    if pid is None or not process_running(pid):
        return False
    return started is None or process_started(pid) == started


def port_answers(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts TCP connections at `host:port`."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def kill_head_processes(pgid: int, head_id: str | None) -> None:
    """SIGKILL what is left of a dead head: its process group (`ray start` leads a session of its own) and
    every process marked with `head_id` (a Train worker or a job driver would go on writing to the store)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    process_running(pgid)  # reap it when it is our child
    if head_id is None:
        return
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(HEAD_MARKER) == head_id:
                proc.kill()


def read_state(path: Path) -> dict[str, Any] | None:
    """The state file's record, or None when there is none or it cannot be read (a torn or foreign file)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_state(path: Path, record: dict[str, Any]) -> None:
    """Replace the state file atomically, so a reader never sees half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, path)
