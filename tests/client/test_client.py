"""minordpo_client against a live server: retried creates, resumed streams, pagination, wait, errors."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from core.store import add_generations
from minordpo_client import ApiError, Client, ServerUnreachableError, WaitTimeoutError
from tests.live_server import FlakyProxy, LiveServer
from tests.serving import free_port


def client_for(server: LiveServer, url: str | None = None, **kwargs) -> Client:
    return Client(url or server.url, server.token, backoff=0.05, **kwargs)


def test_a_create_retried_after_a_dropped_response_makes_one_job(
    live_server: LiveServer, proxy: FlakyProxy
) -> None:
    with client_for(live_server, proxy.url) as client:
        proxy.drop_next_response = True
        job = client.create_job(live_server.spec("dropped-once"))
        assert proxy.dropped == 1, "the first response never reached the client"
        same = [j for j in client.iter_jobs() if j.name == "dropped-once"]
    assert [j.id for j in same] == [job.id]


def test_event_stream_resumes_after_a_dropped_connection(live_server: LiveServer, proxy: FlakyProxy) -> None:
    with client_for(live_server) as direct:
        job = direct.create_job(live_server.spec("streamed"))
        live_server.run_job(job.id, steps=30)
        clean = [(m.id, m.type) for m in direct.events(job.id)]
    assert clean[-1][1] == "status" and len(clean) > 30
    with client_for(live_server, proxy.url) as flaky:
        proxy.cut_next_after = 900  # mid-stream, mid-message
        resumed = [(m.id, m.type) for m in flaky.events(job.id)]
    assert proxy.cuts == 1
    assert resumed == clean  # nothing skipped, nothing repeated


def test_live_stream_and_wait_follow_a_running_job(live_server: LiveServer) -> None:
    with client_for(live_server) as client:
        job = client.create_job(live_server.spec("waited"))
        worker = threading.Timer(1.0, live_server.run_job, args=(job.id, 4))
        worker.start()
        seen = []
        final = client.wait(job.id, timeout=60, on_message=seen.append)
        worker.join()
    assert final.status == "succeeded" and final.progress.step == 4
    assert [m.data["step"] for m in seen if m.type == "metrics"] == [1, 2, 3, 4]
    assert seen[-1].is_terminal_status


def test_wait_times_out_on_a_job_that_does_not_finish(live_server: LiveServer) -> None:
    with client_for(live_server) as client:
        job = client.create_job(live_server.spec("stuck"))
        started = time.monotonic()
        with pytest.raises(WaitTimeoutError):
            client.wait(job.id, timeout=2)
        assert time.monotonic() - started < 10


def test_pagination_yields_every_job_once_while_jobs_are_created(live_server: LiveServer) -> None:
    with client_for(live_server) as client:
        group = f"pages-{time.time_ns()}"
        made = {client.create_job(live_server.spec(f"page-{i}", group=group)).id for i in range(11)}
        seen = []
        for job in client.iter_jobs(group=group, page_size=3):
            seen.append(job.id)
            if len(seen) == 4:  # newer jobs arriving mid-iteration must not shift later pages
                client.create_job(live_server.spec("late", group=group))
    assert len(seen) == len(set(seen)) == 11 and set(seen) == made


def test_errors_carry_the_servers_detail(live_server: LiveServer) -> None:
    with client_for(live_server) as client:
        with pytest.raises(ApiError) as missing:
            client.get_job("job_doesnotexist")
        assert missing.value.status == 404 and "job_doesnotexist" in missing.value.detail
        with pytest.raises(ApiError) as bad:
            client.create_job({**live_server.spec(), "model": str(live_server.root.parent)})
        assert bad.value.status == 422 and bad.value.errors[0]["loc"] == "model.path"
    with Client(live_server.url, "wrong-token", retries=0) as stranger, pytest.raises(ApiError) as denied:
        stranger.list_jobs()
    assert denied.value.status == 401


def test_metrics_checkpoints_events_and_uploads(live_server: LiveServer) -> None:
    with client_for(live_server) as client:
        job = client.create_job(live_server.spec("typed"))
        live_server.run_job(job.id, steps=3)
        assert [r["step"] for r in client.iter_metrics(job.id)] == [1, 2, 3]
        assert client.metrics(job.id, names=["loss"], max_points=2).data[-1]["step"] == 3
        assert [c.step for c in client.checkpoints(job.id).data] == [3]
        assert client.generations(job.id).step is None
        sample = {"prompt": "p", "chosen": " c", "completion": " g"}
        with live_server.db.write() as s:
            add_generations(s, job.id, 2, [sample])
            add_generations(s, job.id, 3, [{**sample, "completion": " h"}])
        assert client.generations(job.id).steps == [2, 3]
        assert client.generations(job.id, step=2).data[0].completion == " g"
        kinds = [e.kind for e in client.iter_stored_events(job.id)]
        assert kinds[0] == "status" and "checkpoint" in kinds
        upload = client.upload_dataset(live_server.root / "train.jsonl")
        assert (
            upload.id.startswith("ds_")
            and client.upload_dataset(live_server.root / "train.jsonl").id == upload.id
        )
        assert client.get_dataset(upload.id).report.rows_valid == 8
        assert client.webhook_secret().secret.startswith("whsec_")


def test_retries_5xx_then_gives_up_clearly() -> None:
    calls = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers.get("idempotency-key"))
        if len(calls) < 3:
            return httpx.Response(503, json={"detail": "busy"})
        return httpx.Response(200, json={"status": "ok"})

    with Client("http://svc", retries=3, backoff=0.01, transport=httpx.MockTransport(flaky)) as client:
        assert client.health() == {"status": "ok"} and len(calls) == 3
    down = Client(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01)
    with down, pytest.raises(ServerUnreachableError, match="cannot reach"):
        down.health()


def test_a_retried_create_keeps_its_idempotency_key_and_4xx_is_not_retried() -> None:
    keys: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["idempotency-key"])
        if len(keys) < 3:
            return httpx.Response(503, headers={"retry-after": "0"}, json={"detail": "restarting"})
        return httpx.Response(
            422, json={"detail": "model.path: not allowed", "errors": [{"loc": "model.path"}]}
        )

    spec = {"name": "k", "model": "/m", "dataset": {"train": "/d.jsonl"}}
    client = Client("http://svc", retries=5, backoff=0.01, transport=httpx.MockTransport(server))
    with client, pytest.raises(ApiError) as refused:
        client.create_job(spec)
    assert len(keys) == 3 and len(set(keys)) == 1  # two 503s retried with the same key, the 422 sent once
    assert refused.value.status == 422 and refused.value.errors == [{"loc": "model.path"}]
