"""The one place that starts, joins, inspects and stops a Ray cluster (everything else uses ray.train)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import ray

from workers.ray_control import RAY_WORKER_ENV, SINGLE_NODE_ENV

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterInfo:
    """What the service needs to know about the cluster it talks to."""

    address: str
    dashboard_url: str | None
    resources: dict[str, float]
    started_here: bool


def _runtime_env(extra_env: dict[str, str] | None) -> dict[str, Any] | None:
    """The job's runtime_env: only the variables this process's environment lacks, else none at all.

    A driver started by the Ray Jobs API on our head inherits the raylet's environment, which already
    holds RAY_WORKER_ENV; with no runtime_env its actors can take the head's warm pool processes
    (workers/warm_pool.py), which only serve actors whose runtime_env string is exactly the pool's.
    """
    missing = {k: v for k, v in {**RAY_WORKER_ENV, **(extra_env or {})}.items() if os.environ.get(k) != v}
    return {"env_vars": missing} if missing else None


def _export_env(*, single_node: bool = False) -> None:
    # The local raylet and the processes it forks inherit the driver's environment, and Ray Train reads
    # some RAY_TRAIN_* settings in the controller before runtime_env applies: set them here too.
    for key, value in {**RAY_WORKER_ENV, **(SINGLE_NODE_ENV if single_node else {})}.items():
        os.environ.setdefault(key, value)


def _info(started_here: bool, context: Any = None) -> ClusterInfo:
    address = current_address()
    dashboard = getattr(context, "dashboard_url", None) or None
    return ClusterInfo(
        address=address,
        dashboard_url=f"http://{dashboard}" if dashboard and "://" not in dashboard else dashboard,
        resources=cluster_resources(),
        started_here=started_here,
    )


def start_local(
    num_cpus: int | None = None,
    *,
    num_gpus: int | None = None,
    dashboard_host: str = "127.0.0.1",
    extra_env: dict[str, str] | None = None,
) -> ClusterInfo:
    """Start a local single-node Ray cluster owned by this process (dashboard on loopback, token auth as configured).

    The dashboard (and with it the state API) must run: without it a force-cancelled Train run leaks its
    placement group (NOTES-RAY pitfall 2). Idempotent: if Ray is already initialised here, returns its info.
    """
    if ray.is_initialized():
        return _info(started_here=True)
    runtime_env = _runtime_env(extra_env)
    _export_env(single_node=True)  # a cluster of this machine alone
    context = ray.init(
        address="local",  # a fresh cluster even if another one (e.g. `ray start`) runs on this machine
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=True,
        dashboard_host=dashboard_host,
        runtime_env=runtime_env,
        log_to_driver=False,
        configure_logging=False,
    )
    return _info(started_here=True, context=context)


def connect(address: str, *, extra_env: dict[str, str] | None = None) -> ClusterInfo:
    """Join an existing cluster (`auto`, `host:port` of a head, or `ray://host:10001`)."""
    if ray.is_initialized():
        return _info(started_here=False)
    runtime_env = _runtime_env(extra_env)
    _export_env()
    context = ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, configure_logging=False)
    return _info(started_here=False, context=context)


def ensure(address: str | None = None, num_cpus: int | None = None) -> ClusterInfo:
    """Connect to `address` (or RAY_ADDRESS) when given, else start a local cluster."""
    address = address or os.environ.get("RAY_ADDRESS")
    return connect(address) if address else start_local(num_cpus)


def shutdown() -> None:
    """Disconnect (and stop the cluster when this process started it)."""
    if ray.is_initialized():
        ray.shutdown()


def is_reachable() -> bool:
    """True when this process is connected and the GCS answers."""
    if not ray.is_initialized():
        return False
    try:
        ray.cluster_resources()
    except Exception:  # noqa: BLE001 - any failure means "not reachable" to a readiness probe
        return False
    return True


def cluster_resources() -> dict[str, float]:
    """Total resources of the cluster (e.g. {"CPU": 2.0, "memory": ...})."""
    return {k: float(v) for k, v in ray.cluster_resources().items()}


def available_resources() -> dict[str, float]:
    """Resources not held by any task, actor or placement group right now."""
    return {k: float(v) for k, v in ray.available_resources().items()}


def current_address() -> str:
    """GCS address of the cluster this process is connected to (what the state API needs)."""
    return str(ray.get_runtime_context().gcs_address)


def train_worker_pids() -> list[int]:
    """Process ids of the live Ray Train worker actors of this cluster (diagnostics, fault-injection tests).

    The state API is asked at this cluster's address explicitly: without it, it picks the most recently
    started cluster on the machine, which may be someone else's.
    """
    from ray.util.state import list_actors

    actors = list_actors(
        address=current_address(),
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        raise_on_missing_output=False,
    )
    return sorted(int(a.pid) for a in actors if a.pid)


def actor_class_names() -> list[str]:
    """Class names of every actor this cluster has started, alive or dead, one entry per actor (diagnostics)."""
    from ray.util.state import list_actors

    actors = list_actors(address=current_address(), limit=10_000, raise_on_missing_output=False)
    return sorted(a.class_name for a in actors)


def leaked_placement_groups(keep: set[str] | None = None) -> list[str]:
    """Ids of placement groups still holding resources, minus `keep` (the ones of runs known to be alive)."""
    keep = keep or set()
    table = ray.util.placement_group_table()
    return [
        pg_id
        for pg_id, info in table.items()
        if info.get("state") in ("CREATED", "PENDING", "RESCHEDULING") and pg_id not in keep
    ]


def remove_leaked_placement_groups(keep: set[str] | None = None) -> list[str]:
    """Remove placement groups left behind by force-cancelled runs; call only when no other run should hold one.

    With the dashboard running (start_local) Ray frees them itself within ~10 s; this is the fallback.
    """
    from ray.util.placement_group import PlacementGroup

    removed = []
    for pg_id in leaked_placement_groups(keep):
        try:
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            removed.append(pg_id)
        except Exception as exc:  # noqa: BLE001 - best effort clean-up
            log.warning("could not remove placement group %s: %s", pg_id, exc)
    return removed
