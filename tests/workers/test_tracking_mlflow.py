"""MLflow tracking of a job's driver against a real MLflow server on loopback (the Ray run is stubbed)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.failures import JobFailure
from core.settings import get_settings
from core.spec import JobSpec
from core.store import Database, create_job, get_job, list_events, transition
from tests.driver_helpers import run_real_driver
from workers import entrypoint
from workers.launch_record import LaunchRecord
from workers.run_outcome import RunOutcome
from workers.tracking_mlflow import JOB_ID_TAG, flatten, mlflow_key

REPO = Path(__file__).resolve().parents[2]
# `mlflow server` needs the full mlflow package, whose pins (pyarrow<26) clash with the service's venv:
# `make mlflow-server` installs it into its own venv; MINORDPO_TEST_MLFLOW names another executable
SERVER_EXE = os.environ.get("MINORDPO_TEST_MLFLOW") or str(REPO / ".mlflow-server" / "bin" / "mlflow")
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 with a SQLite backend store; its URL."""
    if not (Path(SERVER_EXE).exists() or shutil.which(SERVER_EXE)):
        pytest.skip(
            f"no MLflow server at {SERVER_EXE} (run `make mlflow-server` or set MINORDPO_TEST_MLFLOW)"
        )
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        SERVER_EXE, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    log_path = root / "server.log"
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"MLflow server did not start:\n{log_path.read_text()[-3000:]}", pytrace=False)
            time.sleep(0.5)
        from mlflow.tracking import MlflowClient

        MlflowClient(url).search_experiments()  # the first request after start-up can take a while
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _spec(tracking: dict[str, Any] | None = None) -> JobSpec:
    body: dict[str, Any] = {"name": "mlflow-job", "model": "var/models/tiny", "dataset": {"train": "d.jsonl"}}
    if tracking is not None:
        body["tracking"] = tracking
    return JobSpec.model_validate(body)


def _running_job(db: Database, spec: JobSpec) -> str:
    with db.write() as s:
        job, _ = create_job(s, project="p", spec=spec.model_dump(mode="json"))
        transition(s, job.id, "running")
        return job.id


def _drive(
    monkeypatch: pytest.MonkeyPatch, db: Database, job_id: str, tracking_uri: str, outcome: RunOutcome
) -> None:
    """Run the real driver (`workers.entrypoint.run`) with a fake Ray run that reports 3 steps."""

    def fake_run_job(launch: LaunchRecord, **kw: Any) -> RunOutcome:
        kw["on_event"]("started", "training started", {"total_steps": 3})
        for step in (1, 2, 3):
            kw["on_metrics"](step, {"train/loss": 1.0 / step, "train/rewards/margin": 0.1 * step})
        kw["on_metrics"](3, {"eval/loss": 0.25})
        kw["on_event"]("finished", "training finished at step 3", {})
        return outcome

    run_real_driver(
        monkeypatch, job_id, fake_run_job, database_url=str(db.engine.url), mlflow_tracking_uri=tracking_uri
    )


def _kinds(db: Database, job_id: str) -> Callable[[str], list[Any]]:
    with db.read() as s:
        events = list_events(s, job_id, limit=1000)
    return lambda kind: [e for e in events if e.kind == kind]


def test_a_job_reports_params_metric_history_and_status_to_the_server(
    mlflow_server: str, db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    spec = _spec(
        {
            "mlflow": {
                "experiment": "dpo-sweep",
                "run_name": "first",
                "tags": {"team": "rl"},
                "log_model": True,
            }
        }
    )
    job_id = _running_job(db, spec)
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    _drive(monkeypatch, db, job_id, mlflow_server, RunOutcome("succeeded", 3, 3, final_model_dir=final))

    with db.read() as s:
        assert get_job(s, job_id).status == "succeeded"
    events = _kinds(db, job_id)
    assert events("tracking_error") == [] and len(events("tracking_run")) == 1
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("dpo-sweep")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{JOB_ID_TAG}` = '{job_id}'")
    assert run.info.run_id == events("tracking_run")[0].data["mlflow_run_id"]
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert run.data.tags["team"] == "rl" and run.data.tags["minordpo.final_model"] == str(final)
    assert run.data.tags["event.finished"] == "training finished at step 3"
    assert run.data.params["training.learning_rate"] == str(spec.training.learning_rate)
    assert (
        run.data.params["loss.beta"] == str(spec.loss.beta)
        and "tracking.mlflow.experiment" not in run.data.params
    )
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [(3, 0.25)]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "final_model.txt" in artifacts and "events" in artifacts and "model" in artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/config.json"]


def test_a_restarted_driver_reuses_the_run_and_a_failed_job_fails_it(
    mlflow_server: str, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    spec = _spec()  # no tracking section: the default experiment and the job's name
    job_id = _running_job(db, spec)
    tracker = entrypoint._tracker(db, job_id, spec, mlflow_server)
    assert tracker is not None and tracker.run_id is not None  # a first attempt that died before its end
    tracker.finish("cancelled")
    assert MlflowClient(mlflow_server).get_run(tracker.run_id).info.status == "KILLED"
    failed = RunOutcome.failed(JobFailure("worker_error", "boom"), last_step=3, total_steps=3)
    _drive(monkeypatch, db, job_id, mlflow_server, failed)

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("minordpo")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{JOB_ID_TAG}` = '{job_id}'")
    assert [r.info.run_id for r in runs] == [tracker.run_id]
    assert runs[0].info.status == "FAILED" and runs[0].info.run_name == "mlflow-job"
    assert len(client.get_metric_history(tracker.run_id, "train/rewards/margin")) == 3


def test_a_tracking_server_that_is_down_leaves_the_job_succeeded_with_one_event(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = _running_job(db, _spec({"mlflow": {"experiment": "e"}}))
    started = time.monotonic()
    _drive(monkeypatch, db, job_id, f"http://127.0.0.1:{_free_port()}", RunOutcome("succeeded", 3, 3))
    assert time.monotonic() - started < 60  # one failed request, not one per metric point

    with db.read() as s:
        assert get_job(s, job_id).status == "succeeded"
    events = _kinds(db, job_id)
    (error,) = events("tracking_error")
    assert "MLflow tracking at http://127.0.0.1:" in error.message and events("tracking_run") == []
    assert len(events("finished")) == 1


def test_long_spec_values_are_cut_to_mlflows_param_limit() -> None:
    flat = flatten({"a": {"b": "x" * 7000, "c": [1, 2]}, "d": None})
    assert flat == {"a.b": "x" * 6000, "a.c": "[1, 2]", "d": "null"}
    assert mlflow_key("eval/rewards/margin") == "eval/rewards/margin"
    assert mlflow_key("loss[0]+sft") == "loss_0__sft" and len(mlflow_key("k" * 300)) == 250


def test_the_tracking_section_is_bounded() -> None:
    with pytest.raises(ValueError, match="experiment"):
        _spec({"mlflow": {"experiment": "x" * 300}})
    with pytest.raises(ValueError, match="extra"):
        _spec({"mlflow": {"experiment": "e", "server": "http://x"}})


def test_the_driver_env_carries_the_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.dispatcher import DriverEnv

    monkeypatch.setenv("MINORDPO_MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    get_settings.cache_clear()
    try:
        env = DriverEnv.from_settings(get_settings()).as_env()
    finally:
        get_settings.cache_clear()
    assert env["MINORDPO_MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert "MINORDPO_MLFLOW_TRACKING_URI" not in DriverEnv("sqlite://", tmp_path, False).as_env()


def test_a_failure_mid_job_is_one_event_and_turns_tracking_off(db: Database) -> None:
    from workers.tracking_mlflow import MlflowTracker

    class FailingClient:
        calls = 0

        def log_batch(self, *args: Any, **kw: Any) -> None:
            FailingClient.calls += 1
            raise ConnectionError("server went away")

    job_id = _running_job(db, _spec())
    tracker = MlflowTracker(db, job_id, _spec(), "http://127.0.0.1:1")
    tracker.run_id, tracker._client, tracker._flushed_at = "run", FailingClient(), float("-inf")
    for step in range(1, 6):
        tracker.metrics(step, {"train/loss": 1.0})
    tracker.finish("succeeded")
    (error,) = _kinds(db, job_id)("tracking_error")
    assert "ConnectionError: server went away" in error.message
    assert FailingClient.calls == 1 and not tracker.enabled
