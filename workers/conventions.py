"""What the driver, the fit task, the Train workers and the warm pool agree on (standard library only, a leaf).

Every module of `workers/` that needs one of these names imports it from here, so none of them has to
import another for a constant (import-linter keeps `workers/` free of cycles).
"""

from __future__ import annotations

from pathlib import Path

RUN_MARKER = "MINORDPO_RUN"
RUN_ENV = {RUN_MARKER: "1"}
"""The runtime_env env_vars of the task that runs fit(): its warm process imports workers.ray_job, and
Ray Train's controller and workers, started from it, inherit the variable (workers/warm_pool.py)."""

TRAIN_WORKER_VAR = "MINORDPO_TRAIN_WORKER"
TRAIN_WORKER_MARKER = {TRAIN_WORKER_VAR: "1"}
"""Set on Train worker processes (RunConfig.worker_runtime_env): workers.preload imports the whole
training stack only where this is set."""


def job_output_dir(artifacts_dir: Path, job_id: str) -> Path:
    """Where the core loop writes a job's checkpoints and final model (final/ in HF format)."""
    return artifacts_dir / "jobs" / job_id


def shared_cache_dir(artifacts_dir: Path) -> Path:
    """The reference log-prob and hub dataset caches, shared by every job and by `minordpo train`."""
    return artifacts_dir / "cache"
