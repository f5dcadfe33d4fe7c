"""Mirrors a job's metrics, events, final model and status into one MLflow run (best effort, never fatal)."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

from core.spec import JobSpec
from core.store import Database, append_event

log = logging.getLogger("workers.tracking_mlflow")

JOB_ID_TAG = "minordpo.job_id"
RUN_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}
MAX_KEY = 250  # MLflow's limit on param, metric and tag keys
MAX_PARAM_VALUE = 6000  # MLflow 3's limit on a param's value
MAX_TAG_VALUE = 5000  # the smallest tag-value limit among MLflow server versions
BATCH = 100  # params or tags per log_batch call
METRICS_PER_BATCH = 1000  # MLflow's limit on metrics per log_batch call
FLUSH_S = 2.0  # metric points wait at most this long (and until the next point) to go out in one request
NOT_IN_KEYS = re.compile(r"[^A-Za-z0-9_\-. /:]")  # what MLflow refuses in a key


def mlflow_key(name: str) -> str:
    """A metric, param or tag key MLflow accepts: our name with refused characters as `_`, cut to length."""
    return NOT_IN_KEYS.sub("_", name)[:MAX_KEY]


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """The spec as `a.b.c -> string` params; lists are JSON strings; values cut to MLflow's limit."""
    if isinstance(value, dict):
        flat: dict[str, str] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    text = value if isinstance(value, str) else json.dumps(value)
    return {mlflow_key(prefix[:-1]): text[:MAX_PARAM_VALUE]}


class MlflowTracker:
    """One MLflow run per job, found again by its job-id tag when the driver restarts.

    The first failure is recorded once as a `tracking_error` job event and turns the tracker off,
    so a server that is down costs the job one short timeout, not one per metric point.
    """

    def __init__(self, db: Database, job_id: str, spec: JobSpec, tracking_uri: str) -> None:
        # fail fast: MLflow's client otherwise retries each request with backoff for minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.db = db
        self.job_id = job_id
        self.spec = spec
        self.tracking_uri = tracking_uri
        self.run_id: str | None = None
        self.enabled = True
        self._events: list[dict[str, Any]] = []
        self._points: list[Any] = []  # mlflow Metric entities not sent yet
        self._flushed_at = time.monotonic()
        self._client: Any = None

    # ----- the sink JobWriter calls --------------------------------------------------------------
    def start(self) -> None:
        self._guard(self._start, needs_run=False)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self._guard(lambda: self._log_metrics(step, values))

    def event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        self._events.append({"time": time.time(), "kind": kind, "message": message, "data": data})
        self._guard(
            lambda: self._client.set_tag(self.run_id, mlflow_key(f"event.{kind}"), message[:MAX_TAG_VALUE])
        )

    def finish(self, status: str, final_model_dir: str | None = None) -> None:
        self._guard(lambda: self._finish(status, final_model_dir))

    # ----- MLflow calls -------------------------------------------------------------------------
    def _start(self) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        options = self.spec.tracking.mlflow if self.spec.tracking and self.spec.tracking.mlflow else None
        experiment_name = options.experiment if options else "minordpo"
        self._client = client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`{JOB_ID_TAG}` = '{self.job_id}'", max_results=1
        )
        if found:  # a later attempt of the job: the same run, running again
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            return
        tags = {
            **(options.tags if options else {}),
            JOB_ID_TAG: self.job_id,  # after the spec's tags: the run is found again by it
            "minordpo.job_name": self.spec.name,
        }
        run = client.create_run(
            experiment_id, tags=tags, run_name=(options and options.run_name) or self.spec.name
        )
        self.run_id = run.info.run_id
        params = [
            Param(k, v) for k, v in flatten(self.spec.model_dump(mode="json", exclude={"tracking"})).items()
        ]
        for i in range(0, len(params), BATCH):
            client.log_batch(self.run_id, params=params[i : i + BATCH])
        with self.db.write() as s:
            append_event(
                s, self.job_id, "tracking_run", f"MLflow run {self.run_id} in experiment {experiment_name}",
                {"mlflow_run_id": self.run_id, "experiment_id": experiment_id}, dedup_key="mlflow_run",
            )  # fmt: skip

    def _log_metrics(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._points += [Metric(mlflow_key(key), float(v), now, step) for key, v in values.items()]
        if len(self._points) >= METRICS_PER_BATCH or time.monotonic() - self._flushed_at >= FLUSH_S:
            self._flush()

    def _flush(self) -> None:
        """Send the buffered metric points, one request per METRICS_PER_BATCH."""
        while self._points:
            self._client.log_batch(self.run_id, metrics=self._points[:METRICS_PER_BATCH])
            del self._points[:METRICS_PER_BATCH]
        self._flushed_at = time.monotonic()

    def _finish(self, status: str, final_model_dir: str | None) -> None:
        self._flush()
        if final_model_dir is not None:
            self._client.set_tag(self.run_id, "minordpo.final_model", str(final_model_dir)[:MAX_TAG_VALUE])
            self._client.log_text(self.run_id, f"{final_model_dir}\n", "final_model.txt")
            mlflow_spec = self.spec.tracking.mlflow if self.spec.tracking else None
            if mlflow_spec is not None and mlflow_spec.log_model:
                self._client.log_artifacts(self.run_id, str(final_model_dir), "model")
        if self._events:
            lines = "".join(json.dumps(e, default=str) + "\n" for e in self._events)
            self._client.log_text(self.run_id, lines, f"events/{int(time.time())}.jsonl")
        self._client.set_terminated(self.run_id, RUN_STATUS.get(status, "FAILED"))

    def _guard(self, call: Callable[[], None], needs_run: bool = True) -> None:
        """Run one MLflow call; on the first failure record it, switch tracking off, and carry on."""
        if not self.enabled or (needs_run and self.run_id is None):
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - tracking must never fail the job
            self.enabled = False
            message = (
                f"MLflow tracking at {self.tracking_uri} failed, tracking off: {type(exc).__name__}: {exc}"
            )
            log.warning("job %s: %s", self.job_id, message)
            try:
                with self.db.write() as s:
                    append_event(
                        s, self.job_id, "tracking_error", message[:2000],
                        {"tracking_uri": self.tracking_uri}, dedup_key="tracking_error",
                    )  # fmt: skip
            except Exception:  # noqa: BLE001
                log.exception("job %s: could not record the tracking error", self.job_id)
