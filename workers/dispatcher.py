"""The dispatcher: queued jobs -> Ray jobs, watched until they end; reconciles with Ray after a restart.

Each `tick()` (about once a second):
1. reconcile every running job with its Ray job: still pending/running -> keep watching (and force-stop
   it if a cancel has gone unanswered); finished without a recorded outcome -> record Ray's verdict;
   gone (the cluster lost it) -> resubmit (Ray Train resumes from the last checkpoint of the run named
   after the job) while attempts remain, else fail with a clear error;
2. dispatch from the head of the queue, oldest first, while `MAX_CONCURRENT_JOBS` and the cluster's
   CPUs and GPUs allow: a job that can never fit fails at once, naming what it needs and what the
   cluster has; one that must wait stays queued (its queue position is served by the API) and says so
   once in its events.
Between passes it looks at the head of the queue every QUEUE_POLL_S and dispatches a job it has not
seen yet at once, so a POST does not wait for the next pass (whichever process or host took it).
The database is the source of truth; the dispatcher holds no state that a restart would lose.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.settings import Settings
from core.spec import JobSpec
from core.store import (
    Database,
    Job,
    JobError,
    active_jobs,
    append_event,
    claim_queued,
    get_job,
    oldest_queued,
    record_attempt,
    set_ray_submission,
    transition,
)
from workers.ray_control import FINISHED, RayJobs

log = logging.getLogger("workers.dispatcher")
CANCEL_GRACE_S = 20.0
"""How long a running job may take to stop at a step boundary before its Ray job is stopped by force."""
QUEUE_POLL_S = 0.1
"""How often the dispatcher looks for a newly queued job between its full passes (one indexed query)."""
SUBMIT_PATIENCE_S = 60.0
"""How long Ray may refuse a submission (e.g. its job agent still starting) before the job fails."""


#: How each resource a job reserves is named in messages: (plural, how the spec asks for it).
RESOURCE_WORDS = {
    "CPU": ("CPUs", "resources.num_workers x cpus_per_worker"),
    "GPU": ("GPUs", "resources.num_workers x gpus_per_worker, with use_gpu"),
}
Capacity = dict[str, float]


def needs(spec: JobSpec) -> Capacity:
    """What a job reserves on the cluster while it runs."""
    return spec.resources.needs()


def never_fits(need: Capacity, total: Capacity) -> str | None:
    """Why a job can never run on this cluster (the first resource it needs more of than exists), or None."""
    for name, (plural, asked) in RESOURCE_WORDS.items():
        if need.get(name, 0.0) > total.get(name, 0.0):
            return (
                f"the job needs {need[name]:g} {plural} ({asked}) "
                f"but the cluster has {total.get(name, 0.0):g} in all"
            )
    return None


def must_wait(need: Capacity, free: Capacity) -> str | None:
    """What a job waits for (the first resource not free enough now), or None."""
    for name, (plural, _asked) in RESOURCE_WORDS.items():
        if need.get(name, 0.0) > free.get(name, 0.0) + 1e-9:
            return f"waiting for {need[name]:g} free {plural} ({free.get(name, 0.0):g} free now)"
    return None


@dataclass
class DriverEnv:
    """What a job's driver process needs to find the database and the artifacts (absolute paths)."""

    database_url: str
    artifacts_dir: Path
    allow_remote_code: bool
    data_limits: dict[str, int] = field(default_factory=dict)
    mlflow_tracking_uri: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> DriverEnv:
        url = settings.database_url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            url = "sqlite:///" + str(Path(url.removeprefix("sqlite:///")).resolve())
        limits = dataclasses.asdict(settings.data_limits())
        uri = settings.mlflow_tracking_uri
        return cls(url, settings.artifacts_dir.resolve(), settings.allow_remote_code, limits, uri)

    def as_env(self) -> dict[str, str]:
        return {
            "MINORDPO_DATABASE_URL": self.database_url,
            "MINORDPO_ARTIFACTS_DIR": str(self.artifacts_dir),
            "MINORDPO_ALLOW_REMOTE_CODE": "true" if self.allow_remote_code else "false",
            **{f"MINORDPO_{name.upper()}": str(value) for name, value in self.data_limits.items()},
            **({"MINORDPO_MLFLOW_TRACKING_URI": uri} if (uri := self.mlflow_tracking_uri) else {}),
        }

    def write(self) -> Path:
        """Write these settings to `<artifacts>/driver-env.json` (0600, atomically) for the drivers to read.

        A file rather than the Ray job's runtime_env: a runtime_env reaches every actor of the job (the
        database URL with it) and changes the string Ray matches warm worker processes by.
        """
        path = self.artifacts_dir / "driver-env.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self.as_env(), handle)
        os.replace(tmp, path)
        return path


class Dispatcher:
    """Moves jobs from the store to Ray and keeps the two in agreement (see module docstring)."""

    def __init__(
        self,
        db: Database,
        ray_jobs: RayJobs,
        *,
        capacity: Callable[[], Capacity],
        max_concurrent: int,
        driver_env: DriverEnv,
        worker_id: str | None = None,
        ray_source: Callable[[], RayJobs] | None = None,
    ) -> None:
        """`ray_source`: asked at each pass for the Jobs API to use (the service's, which replaces a dead
        local head); jobs whose Ray job the new cluster does not know are then resubmitted as lost."""
        self.db = db
        self.ray = ray_jobs
        self.ray_source = ray_source
        self.capacity = capacity
        self.max_concurrent = max_concurrent
        self.driver_env = driver_env
        self.driver_env_file: Path | None = None
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self._cancel_seen: dict[str, float] = {}
        self._submit_failures: dict[str, float] = {}
        self._queue_head: str | None = None

    # ----- one pass ------------------------------------------------------------------------------
    def tick(self) -> None:
        if self.ray_source is not None:
            self.ray = self.ray_source()
        with self.db.read() as s:
            running = active_jobs(s)
        for job in running:
            try:
                self._reconcile(job)
            except Exception:  # noqa: BLE001 - one bad job must not stop the others
                log.exception("reconciling %s failed", job.id)
        self._dispatch()

    def _submit(self, job: Job) -> None:
        if self.driver_env_file is None or not self.driver_env_file.exists():
            self.driver_env_file = self.driver_env.write()
        entrypoint = [
            sys.executable,
            "-m",
            "workers.entrypoint",
            job.id,
            "--env-file",
            str(self.driver_env_file),
        ]
        self.ray.submit(job.id, entrypoint)
        with self.db.write() as s:
            set_ray_submission(s, job.id, job.id)
            append_event(s, job.id, "submitted", f"submitted to Ray as {job.id} (attempt {job.attempt})",
                         {"attempt": job.attempt}, dedup_key=f"submitted:{job.attempt}")  # fmt: skip

    def _reconcile(self, job: Job) -> None:
        status = self.ray.status(job.id)
        if status is None:
            if job.ray_submission_id is None:  # claimed, not yet accepted by Ray (refused, or we stopped)
                self._try_submit(job)
            else:
                self._lost(job)
            return
        if status in FINISHED:
            self._finished(job, status)
            return
        if job.cancel_requested:
            first_seen = self._cancel_seen.setdefault(job.id, time.monotonic())
            if status == "PENDING" or time.monotonic() - first_seen > CANCEL_GRACE_S:
                log.warning("job %s has not stopped cooperatively; stopping its Ray job", job.id)
                self.ray.stop(job.id)

    def _lost(self, job: Job) -> None:
        spec = JobSpec.model_validate(job.spec)
        retries = spec.resources.max_retries
        with self.db.write() as s:
            if job.cancel_requested:
                transition(s, job.id, "cancelled", message="cancelled (its Ray job was gone)")
                return
            if job.attempt > retries:
                transition(
                    s, job.id, "failed",
                    error=JobError("worker_lost", f"the Ray job was lost and retries are exhausted ({retries} allowed)"),
                )  # fmt: skip
                return
            attempt = record_attempt(s, job.id)
            append_event(s, job.id, "retry", f"Ray job lost; resubmitting (attempt {attempt}) from the last checkpoint",
                         {"attempt": attempt}, dedup_key=f"retry:{attempt}")  # fmt: skip
        with self.db.read() as s:
            fresh = get_job(s, job.id)
        if fresh is not None:
            self._submit(fresh)

    def _finished(self, job: Job, status: str) -> None:
        with self.db.read() as s:
            fresh = get_job(s, job.id)
        if fresh is None or fresh.is_terminal:
            return  # the driver recorded the outcome itself, as it should
        info = self.ray.info(job.id)
        with self.db.write() as s:
            if status == "STOPPED" or fresh.cancel_requested:
                transition(s, job.id, "cancelled", message="cancelled (Ray job stopped)")
            else:
                detail = (info.get("message") or self.ray.logs_tail(job.id, 800)).strip()[-800:]
                transition(
                    s, job.id, "failed",
                    error=JobError("driver_exited", f"the job's driver ended ({status}) without an outcome: {detail}"),
                )  # fmt: skip

    def _queue_has_a_new_head(self) -> bool:
        """Whether the oldest queued job is one this dispatcher has not looked at since the last check."""
        with self.db.read() as s:
            head = oldest_queued(s, 1)
        head_id = head[0].id if head else None
        new = head_id is not None and head_id != self._queue_head
        self._queue_head = head_id
        return new

    def _dispatch(self) -> None:
        while True:
            with self.db.read() as s:
                head = oldest_queued(s, 1)
                running = active_jobs(s)
            if not head or len(running) >= self.max_concurrent:
                return
            job = head[0]
            need = needs(JobSpec.model_validate(job.spec))
            total = self.capacity()
            reason = never_fits(need, total)
            if reason is not None:
                with self.db.write() as s:
                    transition(s, job.id, "failed", error=JobError("insufficient_resources", reason))
                continue
            free = dict(total)
            for other in running:
                for name, amount in needs(JobSpec.model_validate(other.spec)).items():
                    free[name] = free.get(name, 0.0) - amount
            waiting = must_wait(need, free)
            if waiting is not None:
                with self.db.write() as s:
                    append_event(s, job.id, "waiting", waiting, dedup_key="waiting")
                return
            with self.db.write() as s:
                claimed = claim_queued(s, 1, self.worker_id, max_running=self.max_concurrent)
            if not claimed:
                return
            self._try_submit(claimed[0])

    def _try_submit(self, job: Job) -> None:
        """Submit; a refusal (e.g. the job agent still starting) is retried by reconcile until SUBMIT_PATIENCE_S."""
        try:
            self._submit(job)
            self._submit_failures.pop(job.id, None)
        except Exception as exc:  # noqa: BLE001 - Ray refused or was unreachable
            first = self._submit_failures.setdefault(job.id, time.monotonic())
            if time.monotonic() - first < SUBMIT_PATIENCE_S:
                log.warning("submitting %s failed, will retry: %s", job.id, exc)
                return
            self._submit_failures.pop(job.id, None)
            with self.db.write() as s:
                transition(
                    s, job.id, "failed", error=JobError("submit_failed", f"Ray refused the job: {exc}")
                )

    # ----- the loop ------------------------------------------------------------------------------
    def run(self, stop: threading.Event, interval_s: float = 1.0) -> None:
        """Tick every `interval_s` until `stop` is set, dispatching a newly queued job in between (errors
        are logged, never fatal)."""
        log.info("dispatcher %s started (max %d concurrent jobs)", self.worker_id, self.max_concurrent)
        next_tick, look_between = 0.0, True
        while not stop.is_set():
            try:
                if time.monotonic() >= next_tick:
                    next_tick, look_between = time.monotonic() + interval_s, True
                    self.tick()
                elif look_between and self._queue_has_a_new_head():
                    self._dispatch()
            except Exception:  # noqa: BLE001
                look_between = False  # a failing database is tried again at the next pass, not every 0.1 s
                log.exception("dispatcher pass failed")
            stop.wait(min(QUEUE_POLL_S, interval_s))
        log.info("dispatcher %s stopped", self.worker_id)
