"""The dispatcher: queued jobs -> Ray jobs, watched until they end; reconciles with Ray after a restart.

Each `tick()` (about once a second):
1. reconcile every running job with its Ray job: still pending/running -> keep watching (and force-stop
   it if a cancel has gone unanswered); finished without a recorded outcome -> record Ray's verdict;
   gone (the cluster lost it) -> resubmit (Ray Train resumes from the last checkpoint of the run named
   after the job) while attempts remain, else fail with a clear error;
2. dispatch what core.scheduling picks (fair among projects, `spec.priority` within one, then oldest
   first) while `MAX_CONCURRENT_JOBS`, the projects' quotas and the cluster's CPUs and GPUs allow: a
   job that can never fit (the cluster or its project's quota) fails at once, naming what it needs;
   one that must wait stays queued with its `queue_reason` (served by the API) and says so in its events.
Between passes it looks at the ends of the queue every QUEUE_POLL_S and dispatches when they moved (a
job it has not seen yet), so a POST does not wait for the next pass (whichever process or host took it).
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from core.scheduling import (
    Capacity,
    JobLoad,
    ProjectQuota,
    Wait,
    exceeds_quota,
    never_fits,
    plan_dispatch,
    quota_for,
)
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
    queued_span,
    record_attempt,
    set_queue_reasons,
    set_ray_submission,
    transition,
)
from workers.ray_jobs_client import FINISHED, RayJobs

log = logging.getLogger("workers.dispatcher")
CANCEL_GRACE_S = 20.0
"""How long a running job may take to stop at a step boundary before its Ray job is stopped by force."""
QUEUE_POLL_S = 0.1
"""How often the dispatcher looks for a newly queued job between its full passes (one indexed query)."""
SUBMIT_PATIENCE_S = 60.0
"""How long Ray may refuse a submission (e.g. its job agent still starting) before the job fails."""
QUEUE_WINDOW = 1000
"""How many of the oldest queued jobs each dispatch orders (the rest wait their turn to be looked at)."""


def needs(spec: JobSpec) -> Capacity:
    """What a job reserves on the cluster while it runs."""
    return spec.resources.needs()


def job_load(job: Job) -> JobLoad:
    """What the scheduler needs of a stored job: its project, order, priority and reservation."""
    spec = JobSpec.model_validate(job.spec)
    return JobLoad(job.id, job.project, job.seq, needs(spec), spec.resources.num_workers, spec.priority)


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
        quotas: Mapping[str, ProjectQuota] | None = None,
    ) -> None:
        """`ray_source`: asked at each pass for the Jobs API to use (the service's, which replaces a dead
        local head); jobs whose Ray job the new cluster does not know are then resubmitted as lost.
        `quotas`: MINORDPO_PROJECT_QUOTAS (core.scheduling)."""
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
        self.quotas = dict(quotas or {})
        self._queue_span: tuple[int | None, int | None] = (None, None)
        self._loads: dict[str, JobLoad] = {}

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

    def _queue_has_moved(self) -> bool:
        """Whether the queue's oldest or newest job changed since the last check (a new job, a new head)."""
        with self.db.read() as s:
            span = queued_span(s)
        moved = span[1] is not None and span != self._queue_span
        self._queue_span = span
        return moved

    def _dispatch(self) -> None:
        """Fail what can never run, record why the rest waits, and start what core.scheduling picks."""
        with self.db.read() as s:
            queued = oldest_queued(s, QUEUE_WINDOW)
            running = active_jobs(s)
        if not queued:
            return
        self._loads = {job.id: self._loads.get(job.id) or job_load(job) for job in queued}
        total = self.capacity()
        doomed: dict[str, JobError] = {}
        for job in queued:
            load = self._loads[job.id]
            if (why := never_fits(load.need, total)) is not None:
                doomed[job.id] = JobError("insufficient_resources", why)
            elif (why := exceeds_quota(load, quota_for(self.quotas, job.project))) is not None:
                doomed[job.id] = JobError("quota_exceeded", why)
        if doomed:
            with self.db.write() as s:
                for job_id, error in doomed.items():
                    transition(s, job_id, "failed", error=error)
        free = dict(total)
        busy = [job_load(job) for job in running]
        for load in busy:
            for name, amount in load.need.items():
                free[name] = free.get(name, 0.0) - amount
        waiting = [self._loads[job.id] for job in queued if job.id not in doomed]
        plan = plan_dispatch(waiting, busy, self.quotas, free, self.max_concurrent)
        self._record_waits([job for job in queued if job.id in plan.waits], plan.waits)
        for job_id in plan.start:
            with self.db.write() as s:
                claimed = claim_queued(
                    s, 1, self.worker_id, max_running=self.max_concurrent, job_ids=[job_id]
                )
            if not claimed:  # cancelled meanwhile, or another dispatcher started jobs: the next pass decides
                return
            self._try_submit(claimed[0])

    def _record_waits(self, jobs: list[Job], waits: Mapping[str, Wait]) -> None:
        """Store each waiting job's reason where it changed, and tell its events once that it waits."""
        changed = {job.id: str(waits[job.id]) for job in jobs if job.queue_reason != str(waits[job.id])}
        if not changed:
            return
        with self.db.write() as s:
            set_queue_reasons(s, changed)
            for job_id, reason in changed.items():
                append_event(s, job_id, "waiting", waits[job_id].detail, {"queue_reason": reason},
                             dedup_key="waiting")  # fmt: skip

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
                elif look_between and self._queue_has_moved():
                    self._dispatch()
            except Exception:  # noqa: BLE001
                look_between = False  # a failing database is tried again at the next pass, not every 0.1 s
                log.exception("dispatcher pass failed")
            stop.wait(min(QUEUE_POLL_S, interval_s))
        log.info("dispatcher %s stopped", self.worker_id)
