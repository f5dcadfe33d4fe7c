"""A job's driver joining the cluster that runs it (`ray.init`), with the environment our Ray processes need."""

from __future__ import annotations

import os
from typing import Any

import ray

from workers.ray_env import RAY_WORKER_ENV, SINGLE_NODE_ENV


def driver_runtime_env(extra_env: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The driver's runtime_env: only the variables this process's environment lacks, else none at all.

    A driver started by the Ray Jobs API on our head inherits the raylet's environment, which already
    holds RAY_WORKER_ENV; with no runtime_env its actors can take the head's warm pool processes
    (workers/warm_pool.py), which only serve actors whose runtime_env string is exactly the pool's.
    """
    missing = {k: v for k, v in {**RAY_WORKER_ENV, **(extra_env or {})}.items() if os.environ.get(k) != v}
    return {"env_vars": missing} if missing else None


def export_ray_env(*, single_node: bool = False) -> None:
    """Put RAY_WORKER_ENV (and SINGLE_NODE_ENV) into this process's environment, where not set already.

    The local raylet and the processes it forks inherit the driver's environment, and Ray Train reads
    some RAY_TRAIN_* settings in the controller before runtime_env applies.
    """
    for key, value in {**RAY_WORKER_ENV, **(SINGLE_NODE_ENV if single_node else {})}.items():
        os.environ.setdefault(key, value)


def connect(address: str, *, extra_env: dict[str, str] | None = None) -> None:
    """Join an existing cluster (`auto`, `host:port` of a head, or `ray://host:10001`); nothing when joined already.

    Token auth comes with the environment the head gives its drivers (workers.ray_env.use_token_auth).
    """
    if ray.is_initialized():
        return
    runtime_env = driver_runtime_env(extra_env)
    export_ray_env()
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, configure_logging=False)
