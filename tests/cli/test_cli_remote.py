"""The remote commands (submit, list, status, watch, cancel, events, metrics, sweep) against a live server."""

from __future__ import annotations

import csv
import io
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from core.store.dispatch import set_queue_reasons
from minordpo_client import Client
from tests.live_server import LiveServer
from tests.serving import free_port


@pytest.fixture
def run(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MINORDPO_URL", live_server.url)
    monkeypatch.setenv("MINORDPO_TOKEN", live_server.token)
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


@pytest.fixture
def spec_file(live_server: LiveServer, tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(live_server.spec("cli-job")))
    return path


@pytest.fixture
def client(live_server: LiveServer):
    with Client(live_server.url, live_server.token) as c:
        yield c


def test_submit_prints_the_id_and_applies_overrides(run, spec_file: Path, client: Client) -> None:
    result = run(
        "submit", str(spec_file), "--set", "training.learning_rate=1e-5", "--set", "loss.type=sigmoid"
    )
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    job = client.get_job(job_id)
    assert job.spec["training"]["learning_rate"] == 1e-5 and job.spec["loss"]["type"] == "sigmoid"
    assert f"#/jobs/{job_id}" in result.stderr


def test_submit_a_bad_spec_names_the_field(run, spec_file: Path) -> None:
    result = run("submit", str(spec_file), "--set", "loss.beta=-1")
    assert result.exit_code == 2
    assert "loss.beta" in result.stderr and "greater than 0" in result.stderr
    assert "Traceback" not in result.output


def test_submit_refused_by_the_server_is_one_line(run, spec_file: Path, tmp_path: Path) -> None:
    result = run("submit", str(spec_file), "--set", f"model={tmp_path.parent.parent}")
    assert result.exit_code == 2  # the server refused the input (422)
    assert result.stderr.startswith("error: model.path") and result.stderr.count("\n") == 1


def test_submit_upload_replaces_local_files_with_dataset_ids(run, spec_file: Path, client: Client) -> None:
    result = run("submit", str(spec_file), "--upload")
    assert result.exit_code == 0, result.output
    job = client.get_job(result.stdout.strip())
    assert "/datasets/" in job.spec["dataset"]["train"] and "uploaded" in result.stderr


def test_submit_wait_follows_to_success(
    run, spec_file: Path, live_server: LiveServer, client: Client
) -> None:
    before = {j.id for j in client.iter_jobs()}

    def worker() -> None:  # play the worker once the job exists
        for _ in range(100):
            new = [j for j in client.iter_jobs() if j.id not in before]
            if new:
                live_server.run_job(new[0].id, steps=3)
                return
            threading.Event().wait(0.1)

    thread = threading.Thread(target=worker)
    thread.start()
    result = run("submit", str(spec_file), "--wait")
    thread.join()
    assert result.exit_code == 0, result.output
    assert "succeeded" in result.stderr and "3/3" in result.stderr
    assert result.stdout.split() == [result.stdout.strip()] and result.stdout.startswith(
        "job_"
    )  # only the id


def test_watch_exits_non_zero_when_the_job_fails(run, live_server: LiveServer, client: Client) -> None:
    job = client.create_job(live_server.spec("doomed"))
    threading.Timer(0.5, live_server.run_job, args=(job.id, 3), kwargs={"outcome": "failed"}).start()
    result = run("watch", job.id)
    assert result.exit_code == 1
    assert "NaN loss at step 3" in result.stderr


def test_watch_a_finished_job_and_an_unknown_one(run, live_server: LiveServer, client: Client) -> None:
    job = client.create_job(live_server.spec("done"))
    live_server.run_job(job.id, steps=2)
    ok = run("watch", job.id)
    assert ok.exit_code == 0 and "succeeded" in ok.stderr
    missing = run("watch", "job_nope")
    assert missing.exit_code == 1 and "job_nope" in missing.stderr and "Traceback" not in missing.output


def test_list_status_cancel_events_metrics(run, live_server: LiveServer, client: Client) -> None:
    done = client.create_job(live_server.spec("listed", group="cli-list"))
    live_server.run_job(done.id, steps=4)
    queued = client.create_job(live_server.spec("to-cancel", group="cli-list"))

    listed = run("list", "--group", "cli-list")
    assert listed.exit_code == 0 and done.id in listed.stdout and queued.id in listed.stdout
    lines = [json.loads(line) for line in run("list", "--group", "cli-list", "--json").stdout.splitlines()]
    assert [j["id"] for j in lines] == [queued.id, done.id]  # JSON lines, newest first

    status = run("status", done.id)
    assert status.exit_code == 0 and "succeeded" in status.stdout and "4/4" in status.stdout
    assert json.loads(run("status", done.id, "--json").stdout)["id"] == done.id

    with live_server.db.write() as s:  # what the dispatcher records for a job it cannot start yet
        set_queue_reasons(s, {queued.id: "project_quota: 1 of 1 jobs of project team-a running"})
    waiting = run("status", queued.id)
    assert "waiting for" in waiting.stdout and "project_quota: 1 of 1 jobs" in waiting.stdout
    assert "waiting for" not in status.stdout  # only a queued job waits

    cancelled = run("cancel", queued.id)
    assert cancelled.exit_code == 0 and f"{queued.id} cancelled" in cancelled.stdout
    assert client.get_job(queued.id).status == "cancelled"

    events = run("events", done.id)
    assert events.exit_code == 0
    kinds = [line.split()[2] for line in events.stdout.splitlines()]
    assert kinds[0] == "status" and "checkpoint" in kinds and kinds[-1] == "status"
    stored = [json.loads(line) for line in run("events", done.id, "--json").stdout.splitlines()]
    assert [e["seq"] for e in stored] == sorted(e["seq"] for e in stored)
    assert stored[-1]["data"]["to"] == "succeeded"

    table = run("metrics", done.id)
    assert table.exit_code == 0 and "loss" in table.stdout
    rows = list(csv.DictReader(io.StringIO(run("metrics", done.id, "--csv").stdout)))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and float(rows[0]["loss"]) == 1.0


def test_server_down_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINORDPO_URL", f"http://127.0.0.1:{free_port()}")
    result = CliRunner().invoke(app, ["list"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot reach the server at http://127.0.0.1:")
    assert result.stderr.count("\n") == 1


def test_sweep_submits_the_grid_as_one_group(run, spec_file: Path, client: Client) -> None:
    grid = ["--grid", "loss.type=sigmoid,minor_dpo", "--grid", "training.learning_rate=1e-6,1e-4"]
    result = run("sweep", str(spec_file), *grid)
    assert result.exit_code == 0, result.output
    group = result.stdout.split()[1].rstrip(":")
    assert f"#/compare?group={group}" in result.stdout
    jobs = list(client.iter_jobs(group=group))
    combos = {(j.spec["loss"]["type"], j.spec["training"]["learning_rate"]) for j in jobs}
    assert combos == {("sigmoid", 1e-6), ("sigmoid", 1e-4), ("minor_dpo", 1e-6), ("minor_dpo", 1e-4)}
    again = run("sweep", str(spec_file), *grid, "--group", group)
    assert again.exit_code == 0
    assert len(list(client.iter_jobs(group=group))) == 4  # resubmitting a group adds nothing


def test_sweep_grid_errors(run, spec_file: Path) -> None:
    result = run("sweep", str(spec_file), "--grid", "loss.type")
    assert result.exit_code == 2 and "KEY=V1,V2" in result.stderr


def test_bad_input_never_prints_a_traceback(run, tmp_path: Path) -> None:
    bogus = run("list", "--status", "bogus")
    assert bogus.exit_code == 2 and bogus.stderr.startswith("error: ") and bogus.stderr.count("\n") == 1
    missing = run("submit", str(tmp_path / "nope.yaml"))
    assert missing.exit_code == 2 and "cannot read spec" in missing.stderr
    binary = tmp_path / "spec.yaml"
    binary.write_bytes(b"\xff\xfe\x00name: x")
    not_text = run("submit", str(binary))
    assert not_text.exit_code == 2 and "not UTF-8" in not_text.stderr
    no_scheme = run("list", "--url", "localhost:8000")
    assert no_scheme.exit_code == 1 and "bad server URL" in no_scheme.stderr
    for result in (bogus, missing, not_text, no_scheme):
        assert "Traceback" not in result.output


def test_server_text_is_printed_literally(run, live_server: LiveServer, client: Client) -> None:
    from core.store import append_event

    job = client.create_job(live_server.spec("brackets"))
    with live_server.db.write() as s:
        append_event(s, job.id, "warning", "see [/data/x.jsonl] on [bold]rank 0[/bold]")
    result = run("events", job.id)
    assert result.exit_code == 0 and "see [/data/x.jsonl] on [bold]rank 0[/bold]" in result.stdout


@pytest.mark.parametrize("command", ["status", "cancel", "events", "metrics", "watch"])
def test_an_unknown_job_is_one_line(run, command: str) -> None:
    result = run(command, "job_doesnotexist")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "job_doesnotexist" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_dispatcher_refuses_an_out_of_date_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINORDPO_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    from core.settings import get_settings

    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["dispatcher"])
    assert result.exit_code == 2 and "minordpo db upgrade" in result.output


def test_dispatcher_names_a_ray_address_it_cannot_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MINORDPO_DATABASE_URL", f"sqlite:///{tmp_path / 'jobs.db'}")
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", closed)
    from core.settings import get_settings

    get_settings.cache_clear()
    assert CliRunner().invoke(app, ["db", "upgrade"]).exit_code == 0
    get_settings.cache_clear()  # later tests must not see this test's settings
    result = CliRunner().invoke(app, ["dispatcher"])
    assert result.exit_code == 2, result.output
    assert f"no Ray to run jobs on: cannot reach Ray's Jobs API at {closed}" in result.output
    assert "Traceback" not in result.output
