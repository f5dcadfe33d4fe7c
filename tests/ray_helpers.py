"""Test helpers around an in-process Ray cluster: start one of this machine alone, and look inside it
(its Train workers, its actors, placement groups a force-cancelled run left behind)."""

from __future__ import annotations

import logging

import ray

from workers.ray_connect import driver_runtime_env, export_ray_env

log = logging.getLogger(__name__)


def start_local(num_cpus: int | None = None, *, extra_env: dict[str, str] | None = None) -> None:
    """Start a local single-node Ray cluster owned by this process (dashboard on loopback, token auth).

    The dashboard (and with it the state API) must run: without it a force-cancelled Train run leaks its
    placement group (NOTES-RAY pitfall 2). Nothing when Ray is already initialised here. Token auth:
    tests/conftest.py sets RAY_AUTH_MODE before anything imports Ray.
    """
    if ray.is_initialized():
        return
    runtime_env = driver_runtime_env(extra_env)
    export_ray_env(single_node=True)  # a cluster of this machine alone
    ray.init(
        address="local",  # a fresh cluster even if another one (e.g. `ray start`) runs on this machine
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=False,
        configure_logging=False,
    )


def shutdown() -> None:
    """Stop the cluster this process started (or disconnect from the one it joined)."""
    if ray.is_initialized():
        ray.shutdown()


def is_reachable() -> bool:
    """True when this process is connected and the GCS answers."""
    if not ray.is_initialized():
        return False
    try:
        ray.cluster_resources()
    except Exception:  # noqa: BLE001 - any failure means "not reachable"
        return False
    return True


def available_resources() -> dict[str, float]:
    """Resources not held by any task, actor or placement group right now."""
    return {k: float(v) for k, v in ray.available_resources().items()}


def current_address() -> str:
    """GCS address of the cluster this process is connected to (what the state API needs)."""
    return str(ray.get_runtime_context().gcs_address)


def train_worker_pids() -> list[int]:
    """Process ids of the live Ray Train worker actors of this cluster.

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
    """Class names of every actor this cluster has started, alive or dead, one entry per actor."""
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
    """Remove placement groups left behind by force-cancelled runs; call only when no other run should hold one."""
    from ray.util.placement_group import PlacementGroup

    removed = []
    for pg_id in leaked_placement_groups(keep):
        try:
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
            removed.append(pg_id)
        except Exception as exc:  # noqa: BLE001 - best effort clean-up
            log.warning("could not remove placement group %s: %s", pg_id, exc)
    return removed
