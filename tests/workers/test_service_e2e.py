"""The service end to end on a real local Ray: POST over HTTP -> dispatcher -> Ray job -> 2 Ray Train workers.

One `minordpo serve` process per module (its own Ray head, SQLite, MAX_CONCURRENT_JOBS=1); the
kill test restarts it, with two API worker processes from then on. Jobs are tiny (a ~0.8M-parameter
model, a few steps) so the module stays short.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving import pid_alive
from tests.workers.service_helpers import TERMINAL, Server, get, job_body, metric_steps, submit, wait_for
from workers.warm_pool import child_processes, raylet_pid

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, learnable_pairs_file: Path
) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("service"), tiny_model_dir, learnable_pairs_file)
    srv.start()
    head = srv.head_pid()
    try:
        yield srv
    finally:
        srv.stop()
    # a clean shutdown also stops the local Ray head the server started (or reused after the kill)
    deadline = time.monotonic() + 60
    while head is not None and time.monotonic() < deadline and pid_alive(head):
        time.sleep(0.5)
    assert head is not None and not pid_alive(head), "the local Ray head outlived the server"


def events_until_terminal(server: Server, job_id: str) -> tuple[list[dict], list[dict]]:
    """A job's stored events up to its terminal status event, and those after it."""
    headers = {"Accept": "application/json"}
    r = httpx.get(f"{server.url}/v1/jobs/{job_id}/events?limit=1000", headers=headers, timeout=10)
    events = r.json()["data"]
    end = next(
        i for i, e in enumerate(events) if e["kind"] == "status" and (e["data"] or {}).get("to") in TERMINAL
    )
    return events[: end + 1], events[end + 1 :]


def test_job_runs_on_two_ray_workers(server, tiny_model_dir, learnable_pairs_file, receiver):
    from standardwebhooks.webhooks import Webhook
    from transformers import AutoModelForCausalLM

    body = {**job_body(tiny_model_dir, learnable_pairs_file), "webhooks": [{"url": receiver.url}]}
    job_id = submit(server, body)
    job = wait_for(server, job_id, lambda j: j["status"] in TERMINAL)
    assert job["status"] == "succeeded", job.get("error")
    assert job["progress"] == {"step": 6, "total_steps": 6}
    assert metric_steps(server, job_id) == [1, 2, 3, 4, 5, 6]
    ckpts = httpx.get(f"{server.url}/v1/jobs/{job_id}/checkpoints", timeout=10).json()["data"]
    assert [c["step"] for c in ckpts] == [3]
    final = server.root / "var" / "artifacts" / "jobs" / job_id / "final"
    assert AutoModelForCausalLM.from_pretrained(final).config.model_type == "llama"
    # the server's dispatcher delivered the job's webhooks, signed with the project's secret
    secret = httpx.get(f"{server.url}/v1/webhooks/secret", timeout=10).json()["secret"]
    deadline = time.monotonic() + 15
    while len(receiver.requests) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    payloads = [Webhook(secret).verify(body, headers) for headers, body in receiver.requests]
    assert [p["type"] for p in payloads] == ["job.started", "job.checkpoint", "job.succeeded"]
    assert payloads[-1]["data"]["metrics"]["loss"] == job["metrics"]["loss"]
    # each event once, and after the terminal status only the webhooks' delivery outcomes
    events, after = events_until_terminal(server, job_id)
    assert [e["kind"] for e in events].count("final_model") == 1
    assert {e["kind"] for e in after} <= {"webhook"}


def test_fsdp_job_runs_on_two_ray_workers(server, tiny_model_dir, learnable_pairs_file):
    from transformers import AutoModelForCausalLM

    body = job_body(tiny_model_dir, learnable_pairs_file, steps=4, strategy="fsdp")
    body["dataset"]["eval_fraction"] = 0.1
    body["training"].update(eval_generations=2, eval_generation_tokens=4)
    job_id = submit(server, body)
    job = wait_for(server, job_id, lambda j: j["status"] in TERMINAL)
    assert job["status"] == "succeeded", job.get("error")
    assert metric_steps(server, job_id) == [1, 2, 3, 4]
    # the final eval's greedy completions: every rank decoded, rank 0's reached the store through the driver
    generations = httpx.get(f"{server.url}/v1/jobs/{job_id}/generations", timeout=10).json()
    assert generations["steps"] == [4] and [g["index"] for g in generations["data"]] == [0, 1]
    assert all(g["prompt"] and g["chosen"] for g in generations["data"])
    ckpts = httpx.get(f"{server.url}/v1/jobs/{job_id}/checkpoints", timeout=10).json()["data"]
    assert [c["step"] for c in ckpts] == [3]
    assert (Path(ckpts[0]["path"]) / "sharded" / ".metadata").exists()  # torch.distributed.checkpoint
    final = server.root / "var" / "artifacts" / "jobs" / job_id / "final"
    assert AutoModelForCausalLM.from_pretrained(final).config.model_type == "llama"


def _idle_and_busy(raylet: int) -> tuple[set[int], dict[int, tuple[str, dict[str, str]]]]:
    """The raylet's idle worker processes, and the others that run something (title, environment)."""
    children = child_processes(raylet)
    idle = {pid for pid, (title, _) in children.items() if title == "ray::IDLE"}
    busy = {pid: child for pid, child in children.items() if child[0].startswith("ray::") and pid not in idle}
    return idle, busy


def test_a_job_takes_its_processes_from_the_warm_pool(server, tiny_model_dir, learnable_pairs_file):
    head = json.loads((server.root / "var" / "ray-head.json").read_text())
    raylet = raylet_pid(head["node_manager_port"])
    assert raylet is not None
    # supervisor, channel, fit task, controller + its 2 helpers, 2 Train workers: all warm and imported
    deadline = time.monotonic() + 300
    while len(_idle_and_busy(raylet)[0]) < 8:
        assert time.monotonic() < deadline, f"the warm pool did not fill: {_idle_and_busy(raylet)}"
        time.sleep(1)
    warm, busy_before = _idle_and_busy(raylet)
    job_id = submit(server, job_body(tiny_model_dir, learnable_pairs_file, steps=2))
    seen: dict[int, tuple[str, dict[str, str]]] = {}
    while get(server, job_id)["status"] not in TERMINAL:
        seen.update(_idle_and_busy(raylet)[1])
        time.sleep(0.1)
    assert get(server, job_id)["status"] == "succeeded"
    new = {pid: child for pid, child in seen.items() if pid not in busy_before}
    # told apart by environment (titles change with the method a process runs): Train workers carry the
    # worker marker, the fit task and the controller with its helpers the run marker
    workers = {pid for pid, (_, env) in new.items() if env.get("MINORDPO_TRAIN_WORKER")}
    run = {pid for pid, (_, env) in new.items() if env.get("MINORDPO_RUN") and pid not in workers}
    titles = {pid: title for pid, (title, _) in new.items()}
    assert len(workers) == 2 and len(run) >= 2, titles
    assert workers | run <= warm, f"started cold: {sorted((workers | run) - warm)} of {titles}"
    assert any("JobSupervisor" in titles[pid] for pid in warm & titles.keys()), titles
    # a warm process imported torch with a thread per core; each rank still runs as many as its CPUs
    events = httpx.get(
        f"{server.url}/v1/jobs/{job_id}/events", headers={"Accept": "application/json"}, timeout=10
    ).json()["data"]
    assert [e["data"]["cpu_threads"] for e in events if e["kind"] == "workers"] == [1], events


def test_second_job_waits_in_queue_then_runs(server, tiny_model_dir, learnable_pairs_file):
    first = submit(server, job_body(tiny_model_dir, learnable_pairs_file, steps=10))
    second = submit(server, job_body(tiny_model_dir, learnable_pairs_file, steps=4))
    wait_for(server, first, lambda j: j["status"] == "running")
    waiting = get(server, second)
    assert waiting["status"] == "queued" and waiting["queue_position"] == 1
    done_first = wait_for(server, first, lambda j: j["status"] in TERMINAL)
    done_second = wait_for(server, second, lambda j: j["status"] in TERMINAL)
    assert done_first["status"] == done_second["status"] == "succeeded"
    assert done_second["started_at"] >= done_first["finished_at"]  # one after the other


def test_cancel_mid_run_stops_within_seconds(server, tiny_model_dir, learnable_pairs_file):
    job_id = submit(server, job_body(tiny_model_dir, learnable_pairs_file, steps=400))
    wait_for(server, job_id, lambda j: (j["progress"]["step"] or 0) >= 2)
    asked = time.monotonic()
    assert httpx.post(f"{server.url}/v1/jobs/{job_id}/cancel", timeout=10).status_code in (200, 202)
    job = wait_for(server, job_id, lambda j: j["status"] in TERMINAL, timeout=60)
    assert job["status"] == "cancelled"
    assert time.monotonic() - asked < 30
    assert job["progress"]["step"] < 400
    # the checkpoint saved on stopping comes before the run's closing event, and nothing after the status
    events, after = events_until_terminal(server, job_id)
    kinds = [e["kind"] for e in events]
    assert "checkpoint" in kinds and kinds.index("cancelled") > max(
        i for i, k in enumerate(kinds) if k == "checkpoint"
    )
    assert after == []
    # the resources went back: the next job runs
    nxt = submit(server, job_body(tiny_model_dir, learnable_pairs_file, steps=2))
    assert wait_for(server, nxt, lambda j: j["status"] in TERMINAL)["status"] == "succeeded"


def test_a_bad_dataset_and_a_killed_worker_reach_the_api_as_code_and_message(
    server, tiny_model_dir, learnable_pairs_file
):
    bad = server.root / "deep.jsonl"
    bad.write_text("[" * 100_000 + "\n", encoding="utf-8")
    job = wait_for(server, submit(server, job_body(tiny_model_dir, bad)), lambda j: j["status"] in TERMINAL)
    assert job["status"] == "failed" and set(job["error"]) == {"code", "message"}, job
    assert job["error"]["code"] == "dataset_error" and "nested deeper than" in job["error"]["message"]

    raylet = raylet_pid(json.loads((server.root / "var" / "ray-head.json").read_text())["node_manager_port"])
    assert raylet is not None
    job_id = submit(server, job_body(tiny_model_dir, learnable_pairs_file, steps=400, max_retries=0))
    wait_for(server, job_id, lambda j: (j["progress"]["step"] or 0) >= 2)
    ranks = [pid for pid, (_, env) in _idle_and_busy(raylet)[1].items() if env.get("MINORDPO_TRAIN_WORKER")]
    assert len(ranks) == 2, ranks
    os.kill(max(ranks), signal.SIGKILL)
    job = wait_for(server, job_id, lambda j: j["status"] in TERMINAL, timeout=120)
    assert job["status"] == "failed" and set(job["error"]) == {"code", "message"}, job
    assert job["error"]["code"] == "worker_lost" and "was lost" in job["error"]["message"], job
    assert "Traceback" not in job["error"]["message"]


def test_resources_the_cluster_cannot_provide_fail_at_once(server, tiny_model_dir, learnable_pairs_file):
    job_id = submit(server, job_body(tiny_model_dir, learnable_pairs_file, num_workers=4))
    job = wait_for(server, job_id, lambda j: j["status"] in TERMINAL, timeout=20)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "insufficient_resources"
    assert "4 CPUs" in job["error"]["message"] and "2 in all" in job["error"]["message"]


def test_server_kill9_mid_run_job_completes_once(server, tiny_model_dir, learnable_pairs_file):
    job_id = submit(server, job_body(tiny_model_dir, learnable_pairs_file, steps=30))
    wait_for(server, job_id, lambda j: (j["progress"]["step"] or 0) >= 3)
    server.kill9()
    time.sleep(2)
    # Restarted as the parent of two API workers (the dispatcher in the parent, /readyz asking Ray from
    # each worker); the rest of the module and its clean stop run that way.
    server.env["MINORDPO_API_WORKERS"] = "2"
    server.start()  # finds the same Ray head and keeps watching the job
    job = wait_for(server, job_id, lambda j: j["status"] in TERMINAL)
    assert job["status"] == "succeeded", job
    assert metric_steps(server, job_id) == list(range(1, 31))


def test_sweep_of_two_losses_by_two_learning_rates_completes(
    server, tiny_model_dir, learnable_pairs_file, tmp_path, monkeypatch
):
    import yaml
    from typer.testing import CliRunner

    from cli.main import app

    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump(job_body(tiny_model_dir, learnable_pairs_file, steps=2, num_workers=1)))
    monkeypatch.setenv("MINORDPO_URL", server.url)
    grid = ["--grid", "loss.type=sigmoid,minor_dpo", "--grid", "training.learning_rate=1e-4,1e-3"]
    result = CliRunner().invoke(app, ["sweep", str(spec), *grid, "--wait"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    group = result.stdout.split()[1].rstrip(":")
    jobs = httpx.get(f"{server.url}/v1/jobs", params={"group": group}, timeout=10).json()["data"]
    assert len(jobs) == 4 and all(j["status"] == "succeeded" for j in jobs)
    table = result.stdout[result.stdout.index("┃ job") :]
    for job in jobs:  # the summary lists every job with its grid values and final metrics
        row = next(line for line in table.splitlines() if job["id"] in line)
        assert job["spec"]["loss"]["type"] in row and "succeeded" in row
        assert f"{job['metrics']['loss']:.4g}" in row
