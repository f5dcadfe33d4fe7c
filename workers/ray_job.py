"""One training job as a Ray Train run: the trainer, the callback that forwards what it reports, how it ended.

Imports torch and Ray Train, so it runs on a warm Ray process (workers/job_run.py calls `fit_outcome`
as a task), never in the driver. Forwarding: Ray Train V2 calls `UserCallback.after_report` inside the
TrainController actor; the callback pushes each row into the job's `JobChannel` actor, and rank 0
pushes events there too; the driver drains the channel.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer

from core.failures import JobFailure
from workers import ray_compat
from workers.conventions import TRAIN_WORKER_MARKER
from workers.launch_record import LaunchRecord
from workers.ray_failures import failure_from_ray, short_error
from workers.run_outcome import RunOutcome
from workers.train_worker import train_loop_per_worker

log = logging.getLogger(__name__)

# Measured per rank, so they legitimately differ; every other reported value is reduced over ranks.
LOCAL_METRICS = frozenset({"step_time", "pairs_per_second"})


def _rank_differences(metrics: list[dict[str, Any]]) -> list[str]:
    """Keys whose value on some rank differs from rank 0's (the loop reports identical, reduced values)."""
    if len(metrics) < 2:
        return []
    first = metrics[0]
    keys = set().union(*metrics) - LOCAL_METRICS
    return sorted(k for k in keys if any(m.get(k) != first.get(k) for m in metrics[1:]))


class ForwardingCallback(UserCallback):
    """Runs in the TrainController: forwards rank 0's reported row (and persisted checkpoint) to the channel."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel

    def _put(self, item: dict[str, Any]) -> None:
        try:  # synchronous: when fit() returns, every row is already in the channel
            ray.get(self.channel.put.remote(item), timeout=30)
        except Exception as exc:  # noqa: BLE001 - never fail the run over forwarding
            log.warning("could not forward %s: %s", item.get("type"), exc)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        row = dict(metrics[0]) if metrics else {}
        differing = _rank_differences(metrics)
        if differing:
            message = f"ranks reported different values for {', '.join(differing)} at step {row.get('step')}"
            self._put(
                {"type": "event", "kind": "rank_mismatch", "message": message, "data": {"keys": differing}}
            )
        step = int(row.pop("step", -1))
        if checkpoint is not None:
            self._put({"type": "checkpoint", "step": step, "path": str(checkpoint.path), "values": row})
        else:
            self._put({"type": "metrics", "step": step, "values": row})

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        ranks = sorted(worker_exceptions)
        first = worker_exceptions[ranks[0]] if ranks else None
        message = f"worker rank(s) {ranks} failed: {short_error(first)}"
        self._put({"type": "event", "kind": "worker_error", "message": message, "data": {"ranks": ranks}})


class JobTrainer(TorchTrainer):
    """A TorchTrainer that starts no Ray Data `DatasetManager` actor for a run given no Ray datasets.

    Ray Train V2 always adds its `DatasetsCallback`, and that starts a `DatasetManager` actor (a process
    importing Ray Data and Ray Train) even for `datasets=None`; our loop reads its data itself. This
    overrides a private hook of Ray's trainer, through workers.ray_compat (on an untested Ray it passes
    Ray's callbacks through unchanged), so tests/workers/test_ray_job.py checks which actors a real run starts.
    """

    def _create_default_callbacks(self, *args: Any, **kwargs: Any) -> list[Any]:
        callbacks = super()._create_default_callbacks(*args, **kwargs)
        return callbacks if self.datasets else ray_compat.without_datasets_callback(callbacks)


def build_trainer(launch: LaunchRecord, channel: Any) -> JobTrainer:
    """The TorchTrainer for one job; the same (job_id, artifacts_dir) resumes the same Ray run.

    Each Train worker gets the launch record itself (`train_loop_config["launch"]`), not a copy as text.
    """
    res = launch.spec.resources
    launch.output_dir.mkdir(parents=True, exist_ok=True)
    return JobTrainer(
        train_loop_per_worker,
        train_loop_config={"launch": launch, "channel": channel},
        scaling_config=ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=res.use_gpu,
            resources_per_worker=res.worker_resources(),
            placement_strategy=res.placement_strategy,
            accelerator_type=res.accelerator_type,
        ),
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        run_config=RunConfig(
            name=launch.job_id,
            storage_path=str(launch.storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=launch.spec.training.keep_checkpoints),
            failure_config=FailureConfig(max_failures=res.max_retries),
            callbacks=[ForwardingCallback(channel)],
            # marks the worker processes, so a warm one imports the training stack (workers/warm_pool.py)
            worker_runtime_env={"env_vars": TRAIN_WORKER_MARKER},
        ),
    )


def fit_outcome(launch: LaunchRecord, channel: Any) -> RunOutcome:
    """Run the job's Ray Train run to its end in this process and say how it ended (never raises).

    Runs as a Ray task on a warm process (workers/job_run.py), so the driver never imports torch. A
    failure is the one rank 0 recorded in the channel, else Ray's error as workers.ray_failures maps it.
    """
    trainer = build_trainer(launch, channel)
    try:
        result = trainer.fit()
        error = getattr(result, "error", None)
    except Exception as exc:  # noqa: BLE001 - every way a run ends is reported, none raised
        result, error = None, exc
    if error is not None:
        fatal = ray.get(channel.get_fatal.remote())
        return RunOutcome.failed(fatal or failure_from_ray(error, retries=launch.spec.resources.max_retries))
    outcome = getattr(result, "return_value", None)
    if not isinstance(outcome, RunOutcome):
        return RunOutcome.failed(JobFailure("ray_error", "the run ended without saying how (no outcome)"))
    return outcome
