"""Real local Ray: a 2-worker job end to end, a clean failure, cooperative cancel and resume, a killed worker."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import ray_helpers
from workers.conventions import job_output_dir
from workers.job_run import run_job
from workers.launch_record import LaunchRecord

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@dataclass
class Recorder:
    """Collects what run_job forwards; optional hooks fire on the driver thread as rows arrive."""

    metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    checkpoints: list[tuple[int, str, dict[str, float]]] = field(default_factory=list)
    generations: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    on_train_step: Callable[[int], None] | None = None
    on_first_checkpoint: Callable[[int], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def on_metrics(self, step: int, values: dict[str, float]) -> None:
        self.metrics.append((step, values))
        if self.on_train_step and "loss" in values:
            self.on_train_step(step)

    def on_event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        self.events.append((kind, message, data))

    def on_checkpoint(self, step: int, path: str, values: dict[str, float]) -> None:
        self.checkpoints.append((step, path, values))
        if self.on_first_checkpoint and len(self.checkpoints) == 1:
            self.on_first_checkpoint(step)

    @property
    def train_steps(self) -> list[int]:
        return [s for s, v in self.metrics if "loss" in v]

    @property
    def kinds(self) -> list[str]:
        return [k for k, _, _ in self.events]

    def run(self, job_id: str, spec: Any, artifacts: Path) -> Any:
        return run_job(
            LaunchRecord(job_id, spec, artifacts),
            on_metrics=self.on_metrics,
            on_event=self.on_event,
            on_checkpoint=self.on_checkpoint,
            cancel=self.cancel,
            on_generations=self.generations.__setitem__,
        )


def wait_for_cpus(expected: float, timeout: float = 20.0) -> float:
    """Available CPUs once they equal `expected`, or when `timeout` runs out (Ray's view of them lags)."""
    deadline = time.monotonic() + timeout
    cpus = ray_helpers.available_resources().get("CPU", 0.0)
    while cpus != expected and time.monotonic() < deadline:
        time.sleep(0.25)
        cpus = ray_helpers.available_resources().get("CPU", 0.0)
    return cpus


def test_two_worker_job_succeeds_and_forwards_each_step_once(local_ray, job_spec, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    rec = Recorder()
    outcome = rec.run("job-ok", job_spec(eval_generations=2, eval_generation_tokens=4), tmp_path)

    assert outcome.status == "succeeded", outcome
    assert outcome.last_step == 8 and outcome.failure is None
    assert rec.train_steps == list(range(1, 9))
    losses = [v["loss"] for _, v in rec.metrics if "loss" in v]
    assert all(isinstance(x, float) for x in losses) and len(set(losses)) > 1
    assert [s for s, v in rec.metrics if "eval/loss" in v] == [4, 8]
    # rank 0's eval generations came through the job channel, once per eval step
    assert {s: [g["index"] for g in gs] for s, gs in rec.generations.items()} == {4: [0, 1], 8: [0, 1]}
    assert [s for s, _, _ in rec.checkpoints] == [3, 6]
    assert all(
        Path(p, "model").is_dir() and Path(p, "trainer_state.pt").is_file() for _, p, _ in rec.checkpoints
    )
    assert {"started", "completed", "final_model"} <= set(rec.kinds)
    assert "rank_mismatch" not in rec.kinds  # every rank reported the same reduced values
    final = job_output_dir(tmp_path, "job-ok") / "final"
    assert outcome.final_model_dir == final
    assert AutoModelForCausalLM.from_pretrained(final).config.model_type == "llama"
    assert wait_for_cpus(2) == 2


def test_the_channel_hands_a_row_over_as_soon_as_it_comes(local_ray) -> None:
    """A drain waiting for rows returns when one is put, not at the end of its wait (the live-metrics path)."""
    import ray

    from workers.job_channel import JobChannel

    channel = JobChannel.remote()
    try:
        assert ray.get(channel.drain.remote(0.0)) == []
        waiting = channel.drain.remote(30.0)
        time.sleep(0.3)
        put_at = time.monotonic()
        ray.get(channel.put.remote({"type": "metrics", "step": 1}))
        assert ray.get(waiting, timeout=10) == [{"type": "metrics", "step": 1}]
        assert time.monotonic() - put_at < 2.0
        started = time.monotonic()
        assert ray.get(channel.drain.remote(0.3)) == []  # nothing came: empty after its wait
        assert time.monotonic() - started >= 0.3
    finally:
        ray.kill(channel)


def test_a_run_starts_only_the_actors_it_needs(local_ray, job_spec, tmp_path: Path) -> None:
    """No Ray Data manager (the loop reads its own data) and no preemption watcher on a one-node cluster.

    JobTrainer drops the first through a private hook of Ray's, so this fails if a Ray upgrade moves it.
    """
    before = Counter(ray_helpers.actor_class_names())
    outcome = Recorder().run("job-actors", job_spec(max_steps=2), tmp_path)
    started = Counter(ray_helpers.actor_class_names()) - before

    assert outcome.status == "succeeded", outcome
    assert started["RayTrainWorker"] == 2 and started["TrainController"] == 1 and started["JobChannel"] == 1
    assert started["DatasetManager"] == 0 and started["PreemptionWatcher"] == 0, started


def test_dataset_error_reaches_the_driver_as_code_and_message(local_ray, job_spec, tmp_path: Path) -> None:
    rec = Recorder()
    missing = tmp_path / "nope.jsonl"
    started = time.monotonic()
    outcome = rec.run("job-bad-data", job_spec(str(missing), max_retries=1), tmp_path)

    assert outcome.status == "failed" and outcome.failure is not None
    assert outcome.failure.code == "dataset_error", outcome
    assert "nope.jsonl" in outcome.failure.message and "Traceback" not in outcome.failure.message
    assert len(outcome.failure.message) < 500
    assert rec.train_steps == []
    assert time.monotonic() - started < 90
    assert wait_for_cpus(2) == 2


def test_cancel_stops_within_seconds_frees_cpus_and_a_new_driver_resumes(
    local_ray, job_spec, tmp_path: Path
) -> None:
    spec = job_spec(max_steps=400, checkpoint_every=50, eval_every=None)
    asked: list[float] = []
    rec = Recorder()

    def cancel_at(step: int) -> None:
        if step >= 3 and not asked:
            rec.cancel.set()  # what the driver's cancel watcher does; run_job tells the job's channel
            asked.append(time.monotonic())

    rec.on_train_step = cancel_at
    outcome = rec.run("job-cancel", spec, tmp_path)

    assert outcome.status == "cancelled", outcome
    assert time.monotonic() - asked[0] < 30  # stop at the next step, checkpoint, Ray tears the group down
    stopped = outcome.last_step
    assert 3 <= stopped < 400
    assert rec.train_steps == list(range(1, stopped + 1))
    assert rec.checkpoints and rec.checkpoints[-1][0] == stopped
    assert "cancelled" in rec.kinds
    assert wait_for_cpus(2) == 2

    # A new driver with the same job id and artifacts dir resumes the Ray run from its latest checkpoint.
    again = Recorder()
    short = job_spec(max_steps=stopped + 2, checkpoint_every=50, eval_every=None)
    resumed = again.run("job-cancel", short, tmp_path)
    assert resumed.status == "succeeded", resumed
    assert again.train_steps == [stopped + 1, stopped + 2]
    assert ("resumed" in again.kinds) and wait_for_cpus(2) == 2


def test_killed_worker_restarts_from_checkpoint_without_duplicate_steps(
    local_ray, job_spec, tmp_path: Path
) -> None:
    killed: list[int] = []

    def kill_a_worker(step: int) -> None:
        pid = ray_helpers.train_worker_pids()[-1]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    rec = Recorder(on_first_checkpoint=kill_a_worker)
    outcome = rec.run("job-kill", job_spec(max_steps=20, checkpoint_every=4, eval_every=None), tmp_path)

    assert killed
    assert outcome.status == "succeeded", outcome
    assert rec.train_steps == list(range(1, 21))
    assert "worker_error" in rec.kinds and "resumed" in rec.kinds
    assert wait_for_cpus(2) == 2


def test_a_killed_worker_without_retries_fails_the_run_as_worker_lost(
    local_ray, job_spec, tmp_path: Path
) -> None:
    rec = Recorder(
        on_first_checkpoint=lambda step: os.kill(ray_helpers.train_worker_pids()[-1], signal.SIGKILL)
    )
    spec = job_spec(max_steps=200, checkpoint_every=2, eval_every=None, max_retries=0)
    outcome = rec.run("job-kill-no-retry", spec, tmp_path)

    assert outcome.status == "failed" and outcome.failure is not None, outcome
    assert outcome.failure.code == "worker_lost", outcome.failure
    assert "was lost" in outcome.failure.message and "Traceback" not in outcome.failure.message
    assert outcome.last_step >= 2 and outcome.latest_checkpoint is not None
    assert wait_for_cpus(2) == 2


def test_leaked_placement_group_is_found_and_removed(local_ray) -> None:
    from ray.util.placement_group import placement_group

    pg = placement_group([{"CPU": 1}])
    pg.wait(timeout_seconds=30)
    assert wait_for_cpus(1, timeout=10) == 1
    assert pg.id.hex() in ray_helpers.leaked_placement_groups()
    assert ray_helpers.remove_leaked_placement_groups() == [pg.id.hex()]
    assert wait_for_cpus(2) == 2
    assert ray_helpers.is_reachable()
