"""Ray's control plane for the service: our own local head process and the Ray Jobs API (one job per training job).

Local head: `ray start --head --block` as a child in its own session, bound to 127.0.0.1 (GCS,
dashboard and job server), with token auth as Ray configures it. It outlives a `kill -9` of the
server, so running jobs keep going; the restarted server finds it through a state file and reuses
it. A clean shutdown sends SIGTERM, and `--block` makes Ray stop every process it started.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
SINGLE_NODE_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
FINISHED = {"SUCCEEDED", "FAILED", "STOPPED"}
JOBS_API_TIMEOUT_S = 60.0  # one call of the Jobs API (a submit included) on a busy cluster
HEAD_START_ATTEMPTS = 3  # a `ray start` that exits early is retried on new ports (a port taken in between)
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

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        return jobs_api_reachable(self.dashboard_url)


def _head_environment() -> dict[str, str]:
    """This process's environment for `ray start`, less what must not reach Ray's own processes
    (prometheus_client's multiprocess folder of our API workers: Ray's dashboard would write into it)."""
    return {k: v for k, v in os.environ.items() if k.lower() != "prometheus_multiproc_dir"}


def local_head_environment(preload: bool) -> dict[str, str]:
    """The environment our local head starts with; its raylet and every process it starts inherit it.

    `preload`: every Python worker the raylet starts imports workers.preload first (workers/warm_pool.py).
    """
    env = {**_head_environment(), **RAY_WORKER_ENV, **SINGLE_NODE_ENV, "RAY_AUTH_MODE": "token"}
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
) -> LocalHead:
    """Reuse the head recorded in `state_file` if it still answers, else start one and record it.

    A `ray start` that exits before its Jobs API answers is tried again on new ports, `attempts` times
    in all; the error then quotes what Ray printed last (its whole output is in `<state_file>.log`).
    """
    ensure_auth_token(state_file.parent)
    if state_file.exists():
        head = LocalHead(**json.loads(state_file.read_text(encoding="utf-8")))
        if head.alive():
            return head
    cpus = num_cpus or os.cpu_count() or 1
    log_path = state_file.with_suffix(".log")
    state_file.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    for attempt in range(1, attempts + 1):
        printed_before = log_path.stat().st_size if log_path.exists() else 0
        head, proc = _spawn_head(cpus, preload, log_path)
        while proc.poll() is None:
            if jobs_api_reachable(head.dashboard_url):
                state_file.write_text(json.dumps(asdict(head)), encoding="utf-8")
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


def _spawn_head(cpus: int, preload: bool, log_path: Path) -> tuple[LocalHead, subprocess.Popen[bytes]]:
    """Launch `ray start --head --block` on fresh loopback ports, its output appended to `log_path`."""
    ports = dict(zip(HEAD_LISTENERS, listen_ports(len(HEAD_LISTENERS)), strict=True))
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
            env=local_head_environment(preload),
            start_new_session=True,
        )
    head = LocalHead(
        f"127.0.0.1:{ports['port']}",
        f"http://127.0.0.1:{ports['dashboard-port']}",
        proc.pid,
        cpus,
        ports["node-manager-port"],
    )
    return head, proc


def _printed_since(log_path: Path, offset: int, lines: int = 6) -> str:
    """The last `lines` non-blank lines `log_path` gained after `offset`."""
    with log_path.open("rb") as output:
        output.seek(offset)
        text = output.read().decode("utf-8", errors="replace")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def stop_local_head(head: LocalHead, state_file: Path | None = None, timeout_s: float = 30.0) -> None:
    """SIGTERM the `ray start --block` process (it stops the whole head) and forget the state file."""
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
    if state_file is not None:
        state_file.unlink(missing_ok=True)


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


def cluster_cpus(client: RayJobs) -> float:
    """Total CPUs the cluster's nodes offer (Ray's cluster-status endpoint, through the authenticated client)."""
    resp = client._client._do_request("GET", "/api/cluster_status")
    if resp.status_code != 200:
        raise RayUnavailableError(f"cluster status answered {resp.status_code} at {client.address}")
    usage = resp.json()["data"]["clusterStatus"].get("loadMetricsReport", {}).get("usage", {}) or {}
    cpu = usage.get("CPU")
    if isinstance(cpu, list) and len(cpu) == 2:
        return float(cpu[1])
    raise RayUnavailableError(f"cannot read the cluster's CPUs at {client.address}")
