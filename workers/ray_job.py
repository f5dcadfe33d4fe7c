"""Runs one training job as a Ray Train run and forwards its metrics, checkpoints and events to the driver.

Forwarding: Ray Train V2 calls `UserCallback.after_report` inside the TrainController actor, not in
this process. The callback pushes each row into a small per-job `JobChannel` actor (0 CPUs, owned by
the driver); rank 0 pushes events there too. `run_job` calls `fit()` on a helper thread and drains the
channel on the calling thread, so the `on_*` callables run on the caller's thread, in order, one at a
time: the dispatcher can write them to the database as the single writer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback  # Ray 2.60; see JobTrainer

from core.spec import JobSpec
from workers.job_channel import JobChannel
from workers.train_worker import CANCEL_FILE, FatalJobError, train_loop_per_worker

log = logging.getLogger(__name__)

DRAIN_INTERVAL_S = 0.2

OnMetrics = Callable[[int, dict[str, float]], None]
OnEvent = Callable[[str, str, dict[str, Any]], None]
OnCheckpoint = Callable[[int, str, dict[str, float]], None]


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
        message = f"worker rank(s) {ranks} failed: {_short(first)}"
        self._put({"type": "event", "kind": "worker_error", "message": message, "data": {"ranks": ranks}})


@dataclass
class JobOutcome:
    """How a job's Ray run ended."""

    status: Literal["succeeded", "failed", "cancelled"]
    last_step: int
    total_steps: int | None = None
    final_model_dir: Path | None = None
    error_code: str | None = None
    error_message: str | None = None
    latest_checkpoint: str | None = None

    @property
    def error(self) -> dict[str, str] | None:
        if self.error_code is None:
            return None
        return {"code": self.error_code, "message": self.error_message or ""}


def job_output_dir(artifacts_dir: Path, job_id: str) -> Path:
    """Where the core loop writes a job's checkpoints and final model (final/ in HF format)."""
    return artifacts_dir / "jobs" / job_id


def request_cancel(artifacts_dir: Path, job_id: str) -> None:
    """Ask a running job to stop at its next step (it saves a checkpoint and ends `cancelled`).

    A file, so any process that sees the artifacts dir can cancel, including a restarted dispatcher.
    """
    out = job_output_dir(artifacts_dir, job_id)
    out.mkdir(parents=True, exist_ok=True)
    (out / CANCEL_FILE).write_text(f"{time.time()}\n", encoding="utf-8")


def clear_cancel(artifacts_dir: Path, job_id: str) -> None:
    """Remove a cancel request (before deliberately resuming a cancelled job)."""
    (job_output_dir(artifacts_dir, job_id) / CANCEL_FILE).unlink(missing_ok=True)


def _short(exc: BaseException | None, limit: int = 500) -> str:
    if exc is None:
        return "unknown error"
    cause = getattr(exc, "cause", None)  # RayTaskError wraps the user exception as .cause
    if isinstance(cause, BaseException):
        exc = cause
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:limit]


def _failure(exc: BaseException, fatal: dict[str, Any] | None, retries: int) -> tuple[str, str]:
    """(code, message) for a fit() that raised: the recorded fatal error, else a summary of the worker errors."""
    if fatal is not None:
        return str(fatal["code"]), str(fatal["message"])
    failures = getattr(exc, "worker_failures", None) or {}
    for err in failures.values():
        inner = getattr(err, "cause", err)
        if isinstance(inner, FatalJobError):
            return inner.code, inner.message
    if failures:
        rank = min(failures)
        err = failures[rank]
        if isinstance(err, ray.exceptions.RayActorError):
            return (
                "worker_lost",
                f"worker rank {rank} was lost and {retries} retries are used up: {_short(err)}",
            )
        return "worker_error", f"worker rank {rank} failed after {retries} retries: {_short(err)}"
    return "ray_error", _short(exc)


class _Forwarder:
    """Applies channel items to the on_* callables, dropping metric rows replayed after a resume."""

    def __init__(
        self,
        on_metrics: OnMetrics,
        on_event: OnEvent,
        on_checkpoint: OnCheckpoint,
        skip_through_step: int = 0,
    ) -> None:
        self.on_metrics, self.on_event, self.on_checkpoint = on_metrics, on_event, on_checkpoint
        self.last_step: dict[str, int] = {"train": skip_through_step, "eval": skip_through_step}
        self.last_checkpoint_step = skip_through_step - 1
        self.latest_checkpoint: str | None = None
        self.max_step = 0

    def __call__(self, item: dict[str, Any]) -> None:
        kind = item.get("type")
        if kind == "event":
            self.on_event(item["kind"], item["message"], item.get("data") or {})
            return
        step, values = int(item["step"]), item.get("values") or {}
        self.max_step = max(self.max_step, step)
        if kind == "checkpoint":
            if step > self.last_checkpoint_step:
                self.last_checkpoint_step, self.latest_checkpoint = step, item["path"]
                self.on_checkpoint(step, item["path"], values)
            return
        family = "eval" if any(k.startswith("eval/") for k in values) else "train"
        if step > self.last_step.get(family, 0):
            self.last_step[family] = step
            self.on_metrics(step, values)


class JobTrainer(TorchTrainer):
    """A TorchTrainer that starts no Ray Data `DatasetManager` actor for a run given no Ray datasets.

    Ray Train V2 (2.60) always adds its `DatasetsCallback`, and that starts a `DatasetManager` actor (a
    process importing Ray Data and Ray Train, ~1.7 s of CPU) even for `datasets=None`; our loop reads
    its data itself. This overrides a private hook of Ray's trainer, so
    tests/workers/test_ray_job.py checks which actors a real run starts.
    """

    def _create_default_callbacks(self) -> list[Any]:
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [cb for cb in callbacks if not isinstance(cb, DatasetsCallback)]


def build_trainer(
    job_id: str, spec: JobSpec, *, artifacts_dir: Path, channel: Any, allow_remote_code: bool = False
) -> JobTrainer:
    """The TorchTrainer for one job; the same (job_id, artifacts_dir) resumes the same Ray run."""
    res = spec.resources
    output_dir = job_output_dir(artifacts_dir, job_id)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "spec": spec.model_dump_json(),
        "output_dir": str(output_dir),
        "cache_dir": str(artifacts_dir / "cache"),
        "allow_remote_code": allow_remote_code,
        "channel": channel,
    }
    return JobTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=res.use_gpu,
            resources_per_worker={"CPU": res.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        run_config=RunConfig(
            name=job_id,
            storage_path=str((artifacts_dir / "ray").resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.training.keep_checkpoints),
            failure_config=FailureConfig(max_failures=res.max_retries),
            callbacks=[ForwardingCallback(channel)],
        ),
    )


def run_job(
    job_id: str,
    spec: JobSpec,
    *,
    artifacts_dir: Path,
    on_metrics: OnMetrics,
    on_event: OnEvent,
    on_checkpoint: OnCheckpoint,
    allow_remote_code: bool = False,
    skip_through_step: int = 0,
) -> JobOutcome:
    """Run one job to its end on the connected Ray cluster; blocks, calling on_* on this thread as rows arrive.

    Resumes from the latest checkpoint of an earlier run with the same job_id and artifacts_dir (a
    restarted driver). Ray restarts a lost worker group up to `spec.resources.max_retries` times from the
    last checkpoint; rows replayed after such a restart are not forwarded twice. A restarted driver can
    pass `skip_through_step` (the last step its store already holds) to drop rows replayed across drivers.
    """
    channel = JobChannel.remote()
    forward = _Forwarder(on_metrics, on_event, on_checkpoint, skip_through_step)
    box: dict[str, Any] = {}

    def fit() -> None:  # not on the main thread: fit() there installs a SIGINT handler
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    try:
        trainer = build_trainer(
            job_id, spec, artifacts_dir=artifacts_dir, channel=channel, allow_remote_code=allow_remote_code
        )
        thread = threading.Thread(target=fit, name=f"ray-fit-{job_id}", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(DRAIN_INTERVAL_S)
            for item in ray.get(channel.drain.remote()):
                forward(item)
        for item in ray.get(channel.drain.remote()):
            forward(item)
        fatal = ray.get(channel.get_fatal.remote())
    finally:
        ray.kill(channel)
    return _outcome(box, fatal, forward, spec.resources.max_retries)


def _outcome(
    box: dict[str, Any], fatal: dict[str, Any] | None, forward: _Forwarder, retries: int
) -> JobOutcome:
    if "error" in box:
        code, message = _failure(box["error"], fatal, retries)
        return JobOutcome(
            "failed",
            forward.max_step,
            error_code=code,
            error_message=message,
            latest_checkpoint=forward.latest_checkpoint,
        )
    result = box["result"]
    if getattr(result, "error", None) is not None:
        box["error"] = result.error
        return _outcome(box, fatal, forward, retries)
    value = getattr(result, "return_value", None) or {}
    status = value.get("status")
    step = int(value.get("step") or forward.max_step)
    total = value.get("total_steps")
    if status == "failed" or value.get("error"):
        err = value.get("error") or fatal or {"code": "worker_error", "message": "the run failed"}
        return JobOutcome(
            "failed",
            forward.max_step,
            total,
            error_code=err["code"],
            error_message=err["message"],
            latest_checkpoint=forward.latest_checkpoint,
        )
    final = value.get("final_model_dir")
    return JobOutcome(
        "cancelled" if status == "cancelled" else "succeeded",
        step,
        total,
        final_model_dir=Path(final) if final else None,
        latest_checkpoint=forward.latest_checkpoint,
    )
