"""Our own local Ray head, on the service's machine: start or adopt it, stop it, and give it an auth token.

`ray start --head --block` runs as a child in its own session, every listener of it on 127.0.0.1
(LOOPBACK_ONLY_ENV), with token auth as Ray configures it. It outlives a `kill -9` of the server, so
running jobs keep going; the restarted server finds it through its state file (under its own
artifacts dir) and adopts it, unless the head is stopping, belongs to another running server or no
longer answers. A clean shutdown marks the state file "stopping", then sends SIGTERM, and `--block`
makes Ray stop every process it started.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from workers.head_state import (
    HEAD_MARKER,
    kill_head_processes,
    port_answers,
    process_running,
    process_started,
    read_state,
    same_process_running,
    write_state,
)
from workers.ports import listen_ports
from workers.ray_compat import reload_auth_token
from workers.ray_env import AUTH_MODE_ENV, LOOPBACK_ONLY_ENV, RAY_WORKER_ENV, SINGLE_NODE_ENV
from workers.ray_jobs_client import RayUnavailableError, jobs_api_reachable

log = logging.getLogger("workers.ray_head")

HEAD_START_ATTEMPTS = 3  # a `ray start` that exits early is retried on new ports (a port taken in between)
ADOPT_PROBE_S = 10.0  # how long a recorded head's Jobs API may take to answer before it counts as gone
NO_ANSWER = "it no longer answers"
HEAD_LISTENERS = (
    # each on a port of its own, so this head coexists with other Ray clusters on the machine
    "port", "dashboard-port", "node-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
    "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port", "object-manager-port",
)  # fmt: skip


@dataclass
class LocalHead:
    """Where our local head listens, and the `ray start --block` process that owns it."""

    gcs_address: str
    dashboard_url: str
    pid: int
    num_cpus: int
    node_manager_port: int | None = None  # the raylet's; None in a state file from before it was recorded
    ports: dict[str, int] | None = None  # every listener's (HEAD_LISTENERS): a replacement tries them first
    owner_pid: int | None = None  # the server process that started or adopted it
    owner_started: float | None = None  # that process's start time (a pid alone may be reused)
    stopping: bool = False  # recorded before the head is sent SIGTERM: a draining head is nobody's to adopt
    head_id: str | None = None  # HEAD_MARKER's value in its processes' environment

    @classmethod
    def load(cls, state_file: Path) -> LocalHead | None:
        """The head recorded in `state_file` (None: no file, or not a record of ours)."""
        record = read_state(state_file)
        known = {field.name for field in fields(cls)}
        try:
            return cls(**{k: v for k, v in record.items() if k in known}) if record else None
        except TypeError:
            return None

    def running(self) -> bool:
        """Whether its `ray start --block` process runs and its GCS accepts connections."""
        return process_running(self.pid) and port_answers(self.gcs_address)

    def alive(self, timeout_s: float = 5.0) -> bool:
        """Running, and its Jobs API answers within `timeout_s`."""
        return self.running() and jobs_api_reachable(self.dashboard_url, timeout_s)

    def why_not_adopt(self) -> str | None:
        """Why this process must not take this head over (None: it may)."""
        if self.stopping:
            return "it is stopping"
        if self.owner_pid != os.getpid() and same_process_running(self.owner_pid, self.owner_started):
            return f"it belongs to server process {self.owner_pid}, which is running"
        if not self.alive(ADOPT_PROBE_S):
            return NO_ANSWER
        return None

    def owned_here(self) -> LocalHead:
        """This head, recorded as owned by this process."""
        return LocalHead(
            **{**asdict(self), "owner_pid": os.getpid(), "owner_started": process_started(os.getpid())}
        )


def _head_environment() -> dict[str, str]:
    """This process's environment for `ray start`, less what must not reach Ray's own processes
    (prometheus_client's multiprocess folder of our API workers: Ray's dashboard would write into it)."""
    return {k: v for k, v in os.environ.items() if k.lower() != "prometheus_multiproc_dir"}


def local_head_environment(preload: bool) -> dict[str, str]:
    """The environment our local head starts with; its raylet and every process it starts inherit it.

    `preload`: every Python worker the raylet starts imports workers.preload first (workers/warm_pool.py).
    """
    env = {
        **_head_environment(),
        **RAY_WORKER_ENV,
        **SINGLE_NODE_ENV,
        **LOOPBACK_ONLY_ENV,
        AUTH_MODE_ENV: "token",
    }
    if preload:
        env.setdefault("RAY_preload_python_modules", "workers.preload")
    return env


def head_temp_root(state_file: Path) -> Path:
    """The RAY_TMPDIR our local head runs under: its own per state file, unless the operator set one.

    Ray finds "the" cluster of a host through `<RAY_TMPDIR>/ray/ray_current_cluster`, which its job
    supervisor reads to give each job's driver its address: two local heads sharing the default /tmp would
    send each other's jobs to the head that started last. Short, since Ray's Unix sockets live below it."""
    if os.environ.get("RAY_TMPDIR"):
        return Path(os.environ["RAY_TMPDIR"])
    digest = hashlib.sha256(str(state_file.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"minordpo-ray-{digest}"


def ensure_auth_token(folder: Path) -> None:
    """Give the local head a token when the operator set none: `<folder>/ray-auth-token` (0600), via RAY_AUTH_TOKEN_PATH.

    `ray start` refuses token auth without a token (only `ray.init()` makes one). Kept beside the state
    file, the same token serves a head reused after a restart; the head's drivers inherit the variable.
    """
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = (folder / "ray-auth-token").resolve()
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    reload_auth_token()


def start_local_head(
    state_file: Path,
    *,
    num_cpus: int | None = None,
    preload: bool = True,
    timeout_s: float = 180.0,
    attempts: int = HEAD_START_ATTEMPTS,
    ports: dict[str, int] | None = None,
) -> LocalHead:
    """Adopt the head recorded in `state_file` where LocalHead.why_not_adopt allows, else start one and record it.

    A recorded head that no longer answers has what is left of its processes killed first (its jobs are
    the dispatcher's to resubmit). `ports`: the listeners' ports to try first (those of a head being
    replaced, so its addresses stay the same). A `ray start` that exits before its Jobs API answers is
    tried again on new ports, `attempts` times in all; the error then quotes what Ray printed last (its
    whole output is in `<state_file>.log`).
    """
    ensure_auth_token(state_file.parent)
    recorded = LocalHead.load(state_file)
    if recorded is not None:
        reason = recorded.why_not_adopt()
        if reason is None:
            head = recorded.owned_here()
            write_state(state_file, asdict(head))
            return head
        log.warning("not adopting the Ray head recorded in %s (pid %d): %s", state_file, recorded.pid, reason)
        if reason == NO_ANSWER:  # ours, and useless: its jobs are resubmitted to the new head
            kill_head_processes(recorded.pid, recorded.head_id)  # its workers and drivers outlive `ray start`
    cpus = num_cpus or os.cpu_count() or 1
    log_path = state_file.with_suffix(".log")
    state_file.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    temp_root = head_temp_root(state_file)
    for attempt in range(1, attempts + 1):
        printed_before = log_path.stat().st_size if log_path.exists() else 0
        head, proc = _spawn_head(cpus, preload, log_path, temp_root, ports if attempt == 1 else None)
        while proc.poll() is None:
            # up once its Jobs API answers and `ray start` has recorded the address its job supervisor
            # hands to drivers (written after the dashboard starts: a job submitted before it would fail)
            if jobs_api_reachable(head.dashboard_url) and _records_address(temp_root, head):
                head = head.owned_here()
                write_state(state_file, asdict(head))
                return head
            if time.monotonic() > deadline:
                stop_local_head(head, state_file)
                raise RayUnavailableError(
                    f"local Ray head did not answer within {timeout_s:.0f}s; see {log_path}"
                )
            time.sleep(0.5)
        said = _printed_since(log_path, printed_before)
        log.warning(
            "`ray start` exited with %s (attempt %d of %d); it said: %s",
            proc.returncode,
            attempt,
            attempts,
            said,
        )
    raise RayUnavailableError(
        f"`ray start` exited with {proc.returncode} ({attempts} attempts); it said:\n{said}\n(all of it: {log_path})"
    )


def _spawn_head(
    cpus: int, preload: bool, log_path: Path, temp_root: Path, ports: dict[str, int] | None = None
) -> tuple[LocalHead, subprocess.Popen[bytes]]:
    """Launch `ray start --head --block` on `ports` (default: fresh ones) under RAY_TMPDIR `temp_root`, its
    output appended to `log_path`."""
    if ports is None or set(ports) != set(HEAD_LISTENERS):
        ports = dict(zip(HEAD_LISTENERS, listen_ports(len(HEAD_LISTENERS)), strict=True))
    head_id = secrets.token_hex(8)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [
        ray_bin, "start", "--head", "--block", f"--num-cpus={cpus}", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]  # fmt: skip
    with log_path.open("ab") as output:
        proc = subprocess.Popen(
            cmd,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**local_head_environment(preload), HEAD_MARKER: head_id, "RAY_TMPDIR": str(temp_root)},
            start_new_session=True,
        )
    head = LocalHead(
        f"127.0.0.1:{ports['port']}",
        f"http://127.0.0.1:{ports['dashboard-port']}",
        proc.pid,
        cpus,
        ports["node-manager-port"],
        ports,
        head_id=head_id,
    )
    return head, proc


def _records_address(temp_root: Path, head: LocalHead) -> bool:
    """Whether `<temp_root>/ray/ray_current_cluster` names `head`'s GCS."""
    try:
        return (temp_root / "ray" / "ray_current_cluster").read_text().strip() == head.gcs_address
    except OSError:
        return False


def _printed_since(log_path: Path, offset: int, lines: int = 6) -> str:
    """The last `lines` non-blank lines `log_path` gained after `offset`."""
    with log_path.open("rb") as output:
        output.seek(offset)
        text = output.read().decode("utf-8", errors="replace")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def stop_local_head(head: LocalHead, state_file: Path | None = None, timeout_s: float = 30.0) -> None:
    """SIGTERM the `ray start --block` process (it stops the whole head) and forget the state file.

    The state file is marked "stopping" first, so no server adopts the head while it drains, and is
    left alone when it records another head (one that a server sharing it started since).
    """
    if state_file is not None and _records(state_file, head):
        write_state(state_file, {**asdict(head), "stopping": True})
    try:
        os.kill(head.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            os.kill(head.pid, 0)
            time.sleep(0.2)
            try:  # reap it when it is our child
                if os.waitpid(head.pid, os.WNOHANG)[0] == head.pid:
                    break
            except ChildProcessError:
                pass
    except (ProcessLookupError, PermissionError):
        pass
    if state_file is not None and _records(state_file, head):
        state_file.unlink(missing_ok=True)


def _records(state_file: Path, head: LocalHead) -> bool:
    """Whether `state_file` records `head` (the same `ray start` process)."""
    recorded = LocalHead.load(state_file)
    return recorded is not None and recorded.pid == head.pid
