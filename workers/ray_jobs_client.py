"""The service's side of the Ray Jobs API: submit, observe and stop one driver per training job, and read the cluster's size."""

from __future__ import annotations

import shlex
from typing import Any

from workers import ray_compat

FINISHED = {"SUCCEEDED", "FAILED", "STOPPED"}
JOBS_API_TIMEOUT_S = 60.0  # one call of the Jobs API (a submit included) on a busy cluster


class RayUnavailableError(RuntimeError):
    """Ray could not be started or reached; the message says what was tried."""


def jobs_api_reachable(dashboard_url: str, timeout_s: float = 5.0) -> bool:
    """Whether the Ray Jobs API at `dashboard_url` answers (with Ray's auth token; each call given `timeout_s`)."""
    try:
        ray_compat.jobs_client(dashboard_url, timeout_s)
    except Exception:  # noqa: BLE001 - refused, timed out, not yet serving, auth not ready: all "not reachable"
        return False
    return True


class RayJobs:
    """The Ray Jobs API: submit, observe and stop driver processes on the cluster."""

    def __init__(self, address: str, timeout_s: float = JOBS_API_TIMEOUT_S) -> None:
        self.address = address
        try:
            self._client = ray_compat.jobs_client(address, timeout_s)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, AuthenticationError, timeouts...
            raise RayUnavailableError(f"cannot reach Ray's Jobs API at {address}: {exc}") from exc

    def submit(self, submission_id: str, entrypoint: list[str]) -> None:
        """Start `entrypoint` as a Ray job named `submission_id` (it asks for no CPU of its own).

        No runtime_env: every actor of the job would inherit it, and its warm pool processes
        (workers/warm_pool.py) only serve actors whose runtime_env string is exactly theirs.
        """
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

    def cluster_resources(self) -> dict[str, float]:
        """Total CPUs and GPUs the cluster's nodes offer (none of a kind: 0.0).

        On the tested Ray, from the dashboard's cluster status through this authenticated client; on
        another, from the public state API's list of live nodes.
        """
        if ray_compat.supported():
            return self._resources_from_cluster_status()
        return self._resources_from_nodes()

    def _resources_from_cluster_status(self) -> dict[str, float]:
        resp = ray_compat.cluster_status(self._client)
        if resp.status_code != 200:
            raise RayUnavailableError(f"cluster status answered {resp.status_code} at {self.address}")
        usage = resp.json()["data"]["clusterStatus"].get("loadMetricsReport", {}).get("usage", {}) or {}
        cpu, gpu = usage.get("CPU"), usage.get("GPU")
        if not (isinstance(cpu, list) and len(cpu) == 2):
            raise RayUnavailableError(f"cannot read the cluster's CPUs at {self.address}")
        gpus = float(gpu[1]) if isinstance(gpu, list) and len(gpu) == 2 else 0.0  # absent: none
        return {"CPU": float(cpu[1]), "GPU": gpus}

    def _resources_from_nodes(self) -> dict[str, float]:
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(
                address=self.address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False
            )
        except Exception as exc:  # noqa: BLE001 - Ray's state API raises its own errors and requests'
            raise RayUnavailableError(f"cannot list the cluster's nodes at {self.address}: {exc}") from exc
        totals = [
            node["resources_total"] if isinstance(node, dict) else node.resources_total for node in nodes
        ]
        if not any("CPU" in total for total in totals):
            raise RayUnavailableError(f"cannot read the cluster's CPUs at {self.address}")
        return {name: float(sum(total.get(name, 0.0) for total in totals)) for name in ("CPU", "GPU")}
