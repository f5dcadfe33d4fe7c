"""The driver of one training job on the cluster: `python -m workers.entrypoint JOB_ID --env-file F`, run by Ray Jobs.

It reads the job from the database, validates its spec (the one validation on the way to the Train
workers: the spec travels on inside a LaunchRecord, workers/launch_record.py), runs it with Ray Train
(workers.job_run; the driver imports no torch), and is the single writer of the job's metric points,
events, checkpoints and final status.
Metric rows are written as they arrive (idempotently: a step re-reported after a worker-group restart
is not stored twice). A cancel requested in the database is passed to the run as a cooperative stop
(through the job's channel, workers.job_run). Every way the run ends is recorded as one RunOutcome, a
failure as one JobFailure: the job's `error` in the store and the API.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from core.failures import JobFailure
from core.settings import get_settings
from core.spec import JobSpec
from core.store import (
    Database,
    add_checkpoint,
    add_generations,
    append_event,
    append_metrics,
    get_job,
    transition,
    update_progress,
)
from workers.launch_record import LaunchRecord

log = logging.getLogger("workers.entrypoint")
CANCEL_POLL_S = 1.0


class TrackingSink(Protocol):
    """An experiment tracker that gets a copy of what the store gets (workers.tracking_mlflow)."""

    def metrics(self, step: int, values: dict[str, float]) -> None: ...
    def event(self, kind: str, message: str, data: dict[str, Any]) -> None: ...
    def finish(self, status: str, final_model_dir: str | None = None) -> None: ...


class JobWriter:
    """Writes what a run reports into the store, one short transaction per row, then to the tracker."""

    def __init__(self, db: Database, job_id: str, tracker: TrackingSink | None = None) -> None:
        self.db = db
        self.job_id = job_id
        self.tracker = tracker

    def metrics(self, step: int, values: dict[str, float]) -> None:
        with self.db.write() as s:
            append_metrics(s, self.job_id, [{"step": step, "time": time.time(), "values": values}])
        if self.tracker is not None:
            self.tracker.metrics(step, values)

    def event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        with self.db.write() as s:
            if kind == "started" and data.get("total_steps"):
                update_progress(s, self.job_id, total_steps=int(data["total_steps"]))
            append_event(s, self.job_id, kind, message, data)
        if self.tracker is not None:
            self.tracker.event(kind, message, data)

    def finish(self, status: str, final_model_dir: str | None) -> None:
        """Close the tracker's run; called before the store's terminal move, which takes no events after."""
        if self.tracker is not None:
            self.tracker.finish(status, final_model_dir)

    def checkpoint(self, step: int, path: str, values: dict[str, float]) -> None:
        with self.db.write() as s:
            add_checkpoint(s, self.job_id, step, path, values)

    def generations(self, step: int, samples: list[dict[str, Any]]) -> None:
        with self.db.write() as s:
            add_generations(s, self.job_id, step, samples)


def _watch_cancel(db: Database, job_id: str, cancel: threading.Event, done: threading.Event) -> None:
    """Set `cancel` once the database asks the job to stop (or the job is gone); run_job passes it on."""
    while not done.wait(CANCEL_POLL_S):
        with db.read() as s:
            job = get_job(s, job_id)
        if job is None or job.cancel_requested:
            cancel.set()
            return


def _tracker(db: Database, job_id: str, spec: JobSpec, tracking_uri: str | None) -> TrackingSink | None:
    """The job's MLflow run when the operator set a tracking server; started here (failures are events)."""
    if not tracking_uri:
        return None
    from workers.tracking_mlflow import MlflowTracker

    tracker = MlflowTracker(db, job_id, spec, tracking_uri)
    tracker.start()
    return tracker


def run(job_id: str) -> int:
    """Run the job to its end and record the outcome; the exit code is 0 unless recording failed."""
    from workers import ray_connect
    from workers.job_run import run_job

    settings = get_settings()
    db = Database(settings.database_url)
    with db.read() as s:
        job = get_job(s, job_id)
        if job is None:
            log.error("job %s not found in %s", job_id, settings.database_url)
            return 2
        spec = JobSpec.model_validate(job.spec)
        if job.is_terminal:
            log.warning("job %s is already %s", job_id, job.status)
            return 0
    writer = JobWriter(db, job_id, _tracker(db, job_id, spec, settings.mlflow_tracking_uri))
    ray_connect.connect("auto")
    done, cancel = threading.Event(), threading.Event()
    watcher = threading.Thread(
        target=_watch_cancel,
        args=(db, job_id, cancel, done),
        daemon=True,
        name="cancel-watch",
    )
    watcher.start()
    try:
        outcome = run_job(
            LaunchRecord.from_settings(job_id, spec, settings),
            on_metrics=writer.metrics,
            on_event=writer.event,
            on_checkpoint=writer.checkpoint,
            on_generations=writer.generations,
            cancel=cancel,
        )
    except Exception as exc:  # noqa: BLE001 - record every failure as the job's error
        log.exception("job %s crashed", job_id)
        writer.finish("failed", None)
        with db.write() as s:
            transition(s, job_id, "failed", error=JobFailure("driver_error", f"{type(exc).__name__}: {exc}"))
        return 0
    finally:
        done.set()
    writer.finish(outcome.status, str(outcome.final_model_dir) if outcome.final_model_dir else None)
    with db.write() as s:
        if outcome.final_model_dir is not None:
            append_event(
                s, job_id, "final_model", f"final model at {outcome.final_model_dir}",
                {"path": str(outcome.final_model_dir)}, dedup_key="final_model",
            )  # fmt: skip
        transition(
            s,
            job_id,
            outcome.status,
            error=outcome.failure,
            message=f"{outcome.status} at step {outcome.last_step}",
        )
    return 0


USAGE = "usage: python -m workers.entrypoint JOB_ID [--env-file PATH]"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[1] == "--env-file":
        # the dispatcher's settings (database, artifacts): a file it wrote, not the Ray job's runtime_env
        os.environ.update(json.loads(Path(args[2]).read_text(encoding="utf-8")))
        get_settings.cache_clear()
    elif len(args) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return run(args[0])


if __name__ == "__main__":
    sys.exit(main())
