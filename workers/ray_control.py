"""Ray's control plane for the service: our own local head process and the Ray Jobs API (one job per training job).

Local head: `ray start --head --block` as a child in its own session, every listener of it on
127.0.0.1 (LOOPBACK_ONLY_ENV), with token auth as Ray configures it. It outlives a `kill -9` of the
server, so running jobs keep going; the restarted server finds it through its state file (under its
own artifacts dir) and adopts it, unless the head is stopping, belongs to another running server or
no longer answers. A clean shutdown marks the state file "stopping", then sends SIGTERM, and
`--block` makes Ray stop every process it started.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

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

log = logging.getLogger("workers.ray_control")

os.environ.setdefault("RAY_AUTH_MODE", "token")  # our clients send the cluster token; the head enforces it

# Environment every Ray process of ours gets (driver, Train controller, Train workers).
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: the controller polls workers this often; at the 2 s default every
#   `ray.train.report()` stalls ~1.3 s (NOTES-RAY pitfall 1).
# RAY_TRAIN_ENABLE_PRINT_PATCH=0: no log flood when `datasets` fingerprints inside a worker (pitfall 5).
RAY_WORKER_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# For a cluster we start on this machine, bound to loopback, so it is one node: Ray Train's
# PreemptionWatcher (an actor process per run, polling for node drains) has nothing to watch there,
# since draining the only node ends the cluster. A cluster joined through RAY_ADDRESS keeps it.
# Nor does a SIGTERM drain (Ray 2.60 waits up to 30 s for the node's workers to go idle): work on the only
# node has nowhere to move, and a head that lingers draining is one a second server could take for live.
SINGLE_NODE_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
# On Linux, Ray replaces a node IP of 127.0.0.1 by the host's address (services.resolve_ip_for_localhost),
# and its GCS, raylet, workers and agents then listen on all interfaces or on that address. Off, this
# switch (Ray's, for one-machine clusters on macOS and Windows) keeps the node IP 127.0.0.1, and Ray 2.60
# binds every server of the node to 127.0.0.1 only; it also refuses `ray start --address` (joining a
# second node), which a head of this machine alone never needs.
LOOPBACK_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
FINISHED = {"SUCCEEDED", "FAILED", "STOPPED"}
JOBS_API_TIMEOUT_S = 60.0  # one call of the Jobs API (a submit included) on a busy cluster
HEAD_START_ATTEMPTS = 3  # a `ray start` that exits early is retried on new ports (a port taken in between)
ADOPT_PROBE_S = 10.0  # how long a recorded head's Jobs API may take to answer before it counts as gone
NO_ANSWER = "it no longer answers"
HEAD_LISTENERS = (
    # each on a port of its own, so this head coexists with other Ray clusters on the machine
    "port", "dashboard-port", "node-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
    "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port", "object-manager-port",
)  # fmt: skip


class RayUnavailableError(RuntimeError):
    """Ray could not be started or reached; the message says what was tried."""


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
        "RAY_AUTH_MODE": "token",
    }
    if preload:
        env.setdefault("RAY_preload_python_modules", "workers.preload")
    return env


def jobs_api_reachable(dashboard_url: str, timeout_s: float = 5.0) -> bool:
    """Whether the Ray Jobs API at `dashboard_url` answers (with Ray's auth token; each call given `timeout_s`)."""
    try:
        _jobs_client(dashboard_url, timeout_s)
    except Exception:  # noqa: BLE001 - refused, timed out, not yet serving, auth not ready: all "not reachable"
        return False
    return True


def _jobs_client(address: str, timeout_s: float) -> Any:
    """Ray's `JobSubmissionClient` (it checks the connection as it is made), with a timeout on every call.

    Ray's client sets none: a dashboard that accepts connections and never answers would hang the
    dispatcher and /readyz for good. Ray 2.60's client makes every request through `_do_request`.
    """
    from ray.job_submission import JobSubmissionClient

    class BoundedJobSubmissionClient(JobSubmissionClient):
        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", timeout_s)
            return super()._do_request(method, endpoint, **kwargs)

    return BoundedJobSubmissionClient(address)


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


def reload_auth_token() -> None:
    """Make this process re-read Ray's token (Ray caches the first one it loads) after the token source changed."""
    from ray._raylet import AuthenticationTokenLoader  # Ray 2.60; the cache is per process

    AuthenticationTokenLoader.instance().reset_cache()


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
    for attempt in range(1, attempts + 1):
        printed_before = log_path.stat().st_size if log_path.exists() else 0
        head, proc = _spawn_head(cpus, preload, log_path, ports if attempt == 1 else None)
        while proc.poll() is None:
            if jobs_api_reachable(head.dashboard_url):
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
    cpus: int, preload: bool, log_path: Path, ports: dict[str, int] | None = None
) -> tuple[LocalHead, subprocess.Popen[bytes]]:
    """Launch `ray start --head --block` on `ports` (default: fresh ones), its output appended to `log_path`."""
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
            env={**local_head_environment(preload), HEAD_MARKER: head_id},
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


class RayJobs:
    """The Ray Jobs API: submit, observe and stop driver processes on the cluster."""

    def __init__(self, address: str, timeout_s: float = JOBS_API_TIMEOUT_S) -> None:
        self.address = address
        try:
            self._client = _jobs_client(address, timeout_s)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, AuthenticationError, timeouts...
            raise RayUnavailableError(f"cannot reach Ray's Jobs API at {address}: {exc}") from exc

    def submit(self, submission_id: str, entrypoint: list[str]) -> None:
        """Start `entrypoint` as a Ray job named `submission_id` (it asks for no CPU of its own).

        No runtime_env: every actor of the job would inherit it, and its warm pool processes
        (workers/warm_pool.py) only serve actors whose runtime_env string is exactly theirs.
        """
        import shlex

        self._client.submit_job(
            entrypoint=shlex.join(entrypoint),
            submission_id=submission_id,
            entrypoint_num_cpus=0,
            metadata={"minordpo_job": submission_id},
        )

    def status(self, submission_id: str) -> str | None:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED; None when the cluster has no such job."""
        try:
            return str(self._client.get_job_status(submission_id).value)
        except RuntimeError as exc:
            if "does not exist" in str(exc):
                return None
            raise

    def info(self, submission_id: str) -> dict[str, Any]:
        details = self._client.get_job_info(submission_id)
        return {"message": details.message or "", "error_type": details.error_type}

    def logs_tail(self, submission_id: str, chars: int = 2000) -> str:
        try:
            return self._client.get_job_logs(submission_id)[-chars:]
        except RuntimeError:
            return ""

    def stop(self, submission_id: str) -> bool:
        """Ask Ray to stop the job's driver (SIGTERM, then SIGKILL); returns whether it was running."""
        try:
            return bool(self._client.stop_job(submission_id))
        except RuntimeError:
            return False


def cluster_resources(client: RayJobs) -> dict[str, float]:
    """Total CPUs and GPUs the cluster's nodes offer (Ray's cluster-status endpoint, through the authenticated client)."""
    resp = client._client._do_request("GET", "/api/cluster_status")
    if resp.status_code != 200:
        raise RayUnavailableError(f"cluster status answered {resp.status_code} at {client.address}")
    usage = resp.json()["data"]["clusterStatus"].get("loadMetricsReport", {}).get("usage", {}) or {}
    cpu, gpu = usage.get("CPU"), usage.get("GPU")
    if not (isinstance(cpu, list) and len(cpu) == 2):
        raise RayUnavailableError(f"cannot read the cluster's CPUs at {client.address}")
    gpus = float(gpu[1]) if isinstance(gpu, list) and len(gpu) == 2 else 0.0  # absent: none
    return {"CPU": float(cpu[1]), "GPU": gpus}
