"""Drives one job's Ray Train run from its driver, which imports Ray and nothing heavier.

`run_job` starts `fit()` as a Ray task (workers.ray_job.fit_outcome, on a warm process that has torch
and Ray Train imported; see workers/warm_pool.py), handing it the job's LaunchRecord as one object
(workers/launch_record.py), and drains the job's channel on the calling thread
while it runs, so the `on_*` callables run here, in order, one at a time: the driver writes them to
the database as the single writer. Rows replayed after a worker-group restart are not forwarded twice.
A cancel asked of the driver goes to the run through the same channel (rank 0 asks it between steps).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import ray

from workers.conventions import RUN_ENV
from workers.job_channel import JobChannel
from workers.launch_record import LaunchRecord
from workers.ray_failures import failure_from_ray
from workers.run_outcome import RunOutcome

DRAIN_WAIT_S = 0.5
"""The longest one drain of the channel waits for a row (it returns at once when one comes); also how
long after the fit task ends the driver may take to notice."""

RUN_END_KINDS = frozenset({"completed", "cancelled"})
"""Events that close a run (the loop's last word): the driver forwards them after every other row of the run,
since rank 0 sends events straight to the channel while its last checkpoint arrives later, through Ray Train."""

OnMetrics = Callable[[int, dict[str, float]], None]
OnEvent = Callable[[str, str, dict[str, Any]], None]
OnCheckpoint = Callable[[int, str, dict[str, float]], None]
OnGenerations = Callable[[int, list[dict[str, Any]]], None]


class _Forwarder:
    """Applies channel items to the on_* callables, dropping metric rows replayed after a resume and holding
    the run's closing event (RUN_END_KINDS) until `finish()`."""

    def __init__(
        self,
        on_metrics: OnMetrics,
        on_event: OnEvent,
        on_checkpoint: OnCheckpoint,
        skip_through_step: int = 0,
        on_generations: OnGenerations | None = None,
    ) -> None:
        self.on_metrics, self.on_event, self.on_checkpoint = on_metrics, on_event, on_checkpoint
        self.on_generations = on_generations
        self.last_step: dict[str, int] = {"train": skip_through_step, "eval": skip_through_step}
        self.last_checkpoint_step = skip_through_step - 1
        self.latest_checkpoint: str | None = None
        self.max_step = 0
        self.held: list[dict[str, Any]] = []

    def __call__(self, item: dict[str, Any]) -> None:
        kind = item.get("type")
        if kind == "event" and item["kind"] in RUN_END_KINDS:
            self.held.append(item)
            return
        if kind == "event":
            self.on_event(item["kind"], item["message"], item.get("data") or {})
            return
        if kind == "generations":  # a step sent again after a restart: the store keeps the first
            if self.on_generations is not None:
                self.on_generations(int(item["step"]), item.get("samples") or [])
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

    def finish(self) -> None:
        """Forward the held closing events: the run has ended and every other row is in."""
        held, self.held = self.held, []
        for item in held:
            self.on_event(item["kind"], item["message"], item.get("data") or {})


def _fit(launch: LaunchRecord, channel: Any) -> RunOutcome:
    """The task body: imports the heavy module in the task's (warm) process, not in the driver."""
    from workers.ray_job import fit_outcome

    return fit_outcome(launch, channel)


def run_job(
    launch: LaunchRecord,
    *,
    on_metrics: OnMetrics,
    on_event: OnEvent,
    on_checkpoint: OnCheckpoint,
    skip_through_step: int = 0,
    cancel: threading.Event | None = None,
    on_generations: OnGenerations | None = None,
) -> RunOutcome:
    """Run one job to its end on the connected Ray cluster; blocks, calling on_* on this thread as rows arrive.

    Resumes from the latest checkpoint of an earlier run with the same job_id and artifacts_dir (a
    restarted driver). Ray restarts a lost worker group up to `resources.max_retries` times from the
    last checkpoint; rows replayed after such a restart are not forwarded twice. A restarted driver can
    pass `skip_through_step` (the last step its store already holds) to drop rows replayed across drivers.
    Setting `cancel` (from any thread) asks the run to stop at its next step; it then ends cancelled.
    Never raises for the run's own failures, a lost fit task included: they are a failed outcome.
    """
    channel = JobChannel.remote()
    forward = _Forwarder(on_metrics, on_event, on_checkpoint, skip_through_step, on_generations)
    fit = ray.remote(num_cpus=0, max_retries=0, runtime_env={"env_vars": RUN_ENV})(_fit)
    cancel_sent = False
    try:
        done = fit.remote(launch, channel)
        while True:
            if cancel is not None and cancel.is_set() and not cancel_sent:
                channel.request_cancel.remote()
                cancel_sent = True
            finished = bool(ray.wait([done], timeout=0)[0])
            # after `done` is ready, this drain is the last, and takes what is there without waiting
            for item in ray.get(channel.drain.remote(0.0 if finished else DRAIN_WAIT_S)):
                forward(item)
            if finished:
                break
        forward.finish()
        try:
            outcome: RunOutcome = ray.get(done)
        except ray.exceptions.RayError as exc:  # the fit task's process was lost
            outcome = RunOutcome.failed(failure_from_ray(exc))
    finally:
        ray.kill(channel)
    return _completed(outcome, forward)


def _completed(outcome: RunOutcome, forward: _Forwarder) -> RunOutcome:
    """The fit task's outcome with what only the driver knows: the last step and checkpoint it forwarded."""
    last_step = forward.max_step if outcome.status == "failed" else outcome.last_step or forward.max_step
    return dataclasses.replace(outcome, last_step=last_step, latest_checkpoint=forward.latest_checkpoint)
