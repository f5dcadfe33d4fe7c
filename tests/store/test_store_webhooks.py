"""Webhooks end to end without Ray: outbox rows from job events, signed POSTs to a local receiver, retries."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from core.store import Database, add_checkpoint, create_job, list_events, transition
from core.store.webhooks import claim_due, list_deliveries, record_success
from core.webhooks import master_secret, project_secret, sign, verify
from tests.serving import free_port
from tests.webhook_receiver import Receiver
from workers.webhooks import WebhookSender

MASTER = b"test-master-secret"


def _job(db: Database, hooks: list[dict[str, Any]], project: str = "team-a") -> str:
    spec = {"name": "hooked", "model": {"path": "/m"}, "dataset": {"train": "/d.jsonl"}, "webhooks": hooks}
    with db.write() as s:
        job, _ = create_job(s, project=project, spec=spec, group_id="sweep-1")
        return job.id


def _sender(db: Database, **kwargs: Any) -> WebhookSender:
    kwargs.setdefault("allow_private", True)  # the receiver listens on 127.0.0.1
    return WebhookSender(db, lambda project: project_secret(MASTER, project), backoff_s=0.05, **kwargs)


def _drain(sender: WebhookSender, db: Database, job_id: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sender.tick()
        with db.read() as s:
            if all(d.status != "pending" for d in list_deliveries(s, job_id)):
                return
        time.sleep(0.05)
    raise AssertionError("deliveries still pending")


def _run_lifecycle(db: Database, job_id: str) -> None:
    with db.write() as s:
        transition(s, job_id, "running")
    with db.write() as s:
        add_checkpoint(s, job_id, 10, "/ckpt/10")
    with db.write() as s:
        transition(s, job_id, "succeeded")


def test_signed_deliveries_retry_after_a_500_and_are_never_repeated(db: Database, receiver: Receiver) -> None:
    job_id = _job(db, [{"url": receiver.url, "events": ["job.started", "job.checkpoint", "job.succeeded"]}])
    receiver.statuses = [500]  # the first POST (job.started) fails once
    _run_lifecycle(db, job_id)
    sender = _sender(db)
    _drain(sender, db, job_id)

    types = [b["type"] for b in receiver.bodies()]  # in order: later messages wait for the retried one
    assert types == ["job.started", "job.started", "job.checkpoint", "job.succeeded"]
    first, retry = receiver.requests[0][0], receiver.requests[1][0]
    assert first["webhook-id"] == retry["webhook-id"]  # a retry is the same message
    assert len({h["webhook-id"] for h, _ in receiver.requests}) == 3

    verifier = Webhook(project_secret(MASTER, "team-a"))
    for headers, body in receiver.requests:
        assert verifier.verify(body, headers)["data"]["job_id"] == job_id
    with pytest.raises(WebhookVerificationError):
        Webhook(project_secret(MASTER, "team-b")).verify(receiver.requests[0][1], receiver.requests[0][0])

    done = receiver.bodies()[-1]["data"]
    assert done["status"] == "succeeded" and done["group"] == "sweep-1" and done["project"] == "team-a"
    assert receiver.bodies()[2]["data"]["checkpoint"] == {"step": 10}  # no server paths leave the service

    for _ in range(3):  # nothing is due any more: no repeats after success
        assert sender.tick() == 0
    assert len(receiver.requests) == 4
    with db.read() as s:
        deliveries = list_deliveries(s, job_id)
        assert [(d.status, d.attempts) for d in deliveries] == [
            ("delivered", 2),
            ("delivered", 1),
            ("delivered", 1),
        ]
        logged = [e.data for e in list_events(s, job_id) if e.kind == "webhook"]
    assert [(e["type"], e["outcome"]) for e in logged] == [
        ("job.started", "retrying"),
        ("job.started", "delivered"),
        ("job.checkpoint", "delivered"),
        ("job.succeeded", "delivered"),
    ]
    assert logged[0]["error"] == "HTTP 500"


def test_only_the_chosen_events_are_sent(db: Database, receiver: Receiver) -> None:
    job_id = _job(db, [{"url": receiver.url, "events": ["job.failed", "job.succeeded"]}])
    _run_lifecycle(db, job_id)
    _drain(_sender(db), db, job_id)
    assert [b["type"] for b in receiver.bodies()] == ["job.succeeded"]


def test_a_job_without_webhooks_queues_nothing(db: Database) -> None:
    job_id = _job(db, [])
    _run_lifecycle(db, job_id)
    with db.read() as s:
        assert list_deliveries(s, job_id) == []


def test_gives_up_after_max_attempts_and_says_so(db: Database, receiver: Receiver) -> None:
    job_id = _job(db, [{"url": receiver.url, "events": ["job.started"]}])
    receiver.statuses = [503, 503, 503]
    with db.write() as s:
        transition(s, job_id, "running")
    _drain(_sender(db, max_attempts=2), db, job_id)
    assert len(receiver.requests) == 2
    with db.read() as s:
        [delivery] = list_deliveries(s, job_id)
        outcomes = [e.data["outcome"] for e in list_events(s, job_id) if e.kind == "webhook"]
    assert (delivery.status, delivery.attempts, delivery.last_error) == ("failed", 2, "HTTP 503")
    assert outcomes == ["retrying", "failed"]


def test_an_unreachable_receiver_is_retried_then_given_up(db: Database) -> None:
    job_id = _job(db, [{"url": f"http://127.0.0.1:{free_port()}/nothing", "events": ["job.started"]}])
    with db.write() as s:
        transition(s, job_id, "running")
    _drain(_sender(db, max_attempts=2, timeout_s=2.0), db, job_id)
    with db.read() as s:
        [delivery] = list_deliveries(s, job_id)
        outcomes = [e.data["outcome"] for e in list_events(s, job_id) if e.kind == "webhook"]
    assert (delivery.status, delivery.attempts, delivery.last_error) == ("failed", 2, "connection failed")
    assert outcomes == ["retrying", "failed"]


def test_private_addresses_are_refused_unless_allowed(db: Database, receiver: Receiver) -> None:
    job_id = _job(db, [{"url": receiver.url, "events": ["job.started"]}])
    with db.write() as s:
        transition(s, job_id, "running")
    _drain(_sender(db, max_attempts=1, allow_private=False), db, job_id)
    assert receiver.requests == []
    with db.read() as s:
        [delivery] = list_deliveries(s, job_id)
    assert delivery.status == "failed" and "private address" in (delivery.last_error or "")


def test_a_malformed_url_does_not_stall_other_deliveries(db: Database, receiver: Receiver) -> None:
    bad = _job(db, [{"url": "http://a..b:port/x", "events": ["job.started"]}])
    good = _job(db, [{"url": receiver.url, "events": ["job.started"]}])
    for job_id in (bad, good):
        with db.write() as s:
            transition(s, job_id, "running")
    sender = _sender(db, max_attempts=2)
    _drain(sender, db, good)
    _drain(sender, db, bad)
    assert [b["data"]["job_id"] for b in receiver.bodies()] == [good]
    with db.read() as s:
        assert list_deliveries(s, bad)[0].status == "failed"


def test_duplicate_urls_in_a_stored_spec_queue_one_delivery(db: Database) -> None:
    job_id = _job(
        db, [{"url": "https://h.example/x", "events": ["job.started"]}, {"url": "https://h.example/x"}]
    )
    with db.write() as s:
        assert transition(s, job_id, "running")  # no unique-constraint failure blocks the start
    with db.read() as s:
        assert [d.event_type for d in list_deliveries(s, job_id)] == ["job.started"]


def test_a_sender_whose_lease_lapsed_cannot_record(db: Database) -> None:
    job_id = _job(db, [{"url": "https://h.example/x", "events": ["job.started"]}])
    with db.write() as s:
        transition(s, job_id, "running")
    with db.write() as s:
        [first] = claim_due(s, lease_s=0.0)  # lease already over
    with db.write() as s:
        [second] = claim_due(s, lease_s=60.0)  # another sender takes it
    assert first.id == second.id and first.claim_token != second.claim_token
    with db.write() as s:
        assert not record_success(s, first)  # the late sender's outcome is ignored
        assert record_success(s, second)
    with db.read() as s:
        [delivery] = list_deliveries(s, job_id)
    assert (delivery.status, delivery.attempts) == ("delivered", 1)


def test_signature_round_trip_and_tampering() -> None:
    secret = project_secret(MASTER, "team-a")
    assert secret.startswith("whsec_") and secret != project_secret(MASTER, "team-b")
    body, now = b'{"type":"job.started"}', int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": sign(secret, "msg_1", now, body),
    }
    assert verify(secret, headers, body, now=now)
    assert Webhook(secret).verify(body, headers) == {"type": "job.started"}  # the reference library agrees
    assert not verify(secret, headers, body + b" ", now=now)
    assert not verify(secret, {**headers, "webhook-id": "msg_2"}, body, now=now)
    assert not verify(secret, headers, body, now=now + 3600)  # replayed too late


def test_generated_master_secret_is_created_once_and_private(tmp_path: Path) -> None:
    first = master_secret(None, tmp_path)
    assert master_secret(None, tmp_path) == first and len(first) >= 32
    assert os.stat(tmp_path / "webhook-secret").st_mode & 0o777 == 0o600
    assert master_secret("configured", tmp_path) == b"configured"
    (tmp_path / "webhook-secret").write_bytes(b"")  # e.g. a crash while writing: refuse, never sign with it
    with pytest.raises(ValueError, match="no usable webhook secret"):
        master_secret(None, tmp_path)
