"""SSE contract of GET /v1/jobs/{id}/events against a real uvicorn: order, ids, resume, end, heartbeats, auth, one poller."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import event

from api.main import create_app
from api.services.stream import StreamHub
from api.services.stream_reads import Cursor
from core.settings import Settings
from core.store import Database, append_event, append_metrics, cancel_job, create_job, transition, upgrade
from tests.api.conftest import auth
from tests.serving import free_port

POLL_S = 0.05
HEARTBEAT_S = 0.3
SPEC = {"name": "sse-job", "model": "m", "dataset": {"train": "t.jsonl"}}


@dataclass
class Sse:
    """What a client read: (id, data) messages, comment lines, and whether the server closed the stream."""

    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    closed: bool = False


@dataclass
class Live:
    """A running server: its base URL, the app and its database."""

    url: str
    app: FastAPI
    db: Database

    @property
    def hub(self) -> StreamHub:
        return self.app.state.stream_hub


@contextmanager
def serving(app: FastAPI) -> Iterator[Live]:
    """`app` behind a real uvicorn (in a thread), with a fast poller and heartbeat."""
    app.state.stream_hub = StreamHub(app.state.db, poll_interval=POLL_S, heartbeat=HEARTBEAT_S)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{port}", app, app.state.db)
    finally:
        server.should_exit = True
        thread.join(5)


@pytest.fixture
def live(app: FastAPI) -> Iterator[Live]:
    """The test app (SQLite) served by uvicorn."""
    with serving(app) as srv:
        yield srv


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def live_any(request: pytest.FixtureRequest, make_settings: Callable[..., Settings]) -> Iterator[Live]:
    """The app on SQLite, and on a temporary PostgreSQL database (skipped without a server)."""
    if request.param == "sqlite":
        app = create_app(make_settings())
        with serving(app) as srv:
            yield srv
        app.state.db.dispose()
        return
    from tests.store.conftest import temporary_pg_database

    with temporary_pg_database() as url:
        upgrade(url)
        app = create_app(make_settings(database_url=url))
        with serving(app) as srv:
            yield srv
        app.state.db.dispose()


def new_job(db: Database, project: str = "team-a", *, running: bool = True) -> str:
    with db.write() as s:
        job, _ = create_job(s, project=project, spec=SPEC)
        if running:
            transition(s, job.id, "running")
        return job.id


def metrics(db: Database, job_id: str, *steps: int, **values: float) -> None:
    with db.write() as s:
        append_metrics(
            s, job_id, [{"step": st, "values": values or {"loss": 1.0 / (st + 1)}} for st in steps]
        )


def finish(db: Database, job_id: str, status: str = "succeeded") -> None:
    with db.write() as s:
        transition(s, job_id, status)


def read(
    live: Live,
    job_id: str,
    *,
    last_id: str | None = None,
    count: int | None = None,
    seconds: float = 10.0,
    headers: dict[str, str] | None = None,
) -> Sse:
    """Read the stream until it closes, `count` messages arrived, or `seconds` passed."""
    out = Sse()
    hdrs = {**(headers if headers is not None else auth()), **({"Last-Event-ID": last_id} if last_id else {})}
    deadline = time.monotonic() + seconds
    with (
        httpx.Client(timeout=httpx.Timeout(seconds, connect=5)) as client,
        client.stream("GET", f"{live.url}/v1/jobs/{job_id}/events", headers=hdrs) as resp,
    ):
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        ident, data = None, []
        for line in resp.iter_lines():
            if line.startswith(":"):
                out.comments.append(line[1:].strip())
            elif line.startswith("id:"):
                ident = line[3:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                assert ident is not None, "every message carries an id"
                out.messages.append((ident, json.loads("\n".join(data))))
                ident, data = None, []
            if (count is not None and len(out.messages) >= count) or time.monotonic() > deadline:
                return out
        out.closed = True
    return out


def key(message: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a message's content (metric rows by step and names)."""
    if message["type"] == "metrics":
        return ("metrics", message["step"], tuple(sorted(message["values"])))
    return (message["type"], message["seq"])


def id_order(ident: str) -> tuple[int, int, int]:
    c = Cursor.parse(ident)
    return (c.seq, c.step, c.names)


def test_history_in_order_with_increasing_ids_then_end(live: Live) -> None:
    job = new_job(live.db)
    metrics(live.db, job, 1, 2)
    with live.db.write() as s:
        append_event(s, job, "checkpoint", "saved step 2", {"step": 2})
    metrics(live.db, job, 3)
    finish(live.db, job)
    got = read(live, job)
    assert got.closed
    kinds = [(m["type"], m.get("status") or m.get("kind") or m.get("step")) for _, m in got.messages]
    assert kinds == [
        ("status", "queued"),
        ("status", "running"),
        ("metrics", 1),
        ("metrics", 2),
        ("event", "checkpoint"),
        ("metrics", 3),
        ("status", "succeeded"),
    ]
    ids = [i for i, _ in got.messages]
    assert ids[:2] == ["1", "2"] and ids[-1] == "4.3.1"
    assert all(id_order(a) < id_order(b) for a, b in zip(ids, ids[1:], strict=False))
    assert got.messages[2][1]["values"] == {"loss": 0.5}
    # At the end of a finished job: 204, so EventSource stops reconnecting.
    r = httpx.get(f"{live.url}/v1/jobs/{job}/events", headers={**auth(), "Last-Event-ID": ids[-1]})
    assert r.status_code == 204
    resumed = read(live, job, last_id=ids[3])
    assert [i for i, _ in resumed.messages] == ids[4:] and resumed.closed


def test_resume_live_has_no_gaps_and_no_duplicates(live_any: Live) -> None:
    live = live_any
    job = new_job(live.db)
    stop = threading.Event()

    def writer() -> None:
        for step in range(1, 41):
            metrics(live.db, job, step)
            if step % 10 == 0:
                with live.db.write() as s:
                    append_event(s, job, "checkpoint", f"step {step}", {"step": step})
            time.sleep(0.01)
            if stop.is_set():
                return
        finish(live.db, job)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen: list[tuple[str, dict[str, Any]]] = []
        last: str | None = None
        for _ in range(30):  # read a few messages at a time, disconnecting in between
            part = read(live, job, last_id=last, count=7)
            seen += part.messages
            last = seen[-1][0] if seen else None
            if part.closed:
                break
        assert part.closed, "the stream ends after the terminal status"
    finally:
        stop.set()
        thread.join()
    whole = read(live, job)
    assert [i for i, _ in seen] == [i for i, _ in whole.messages]
    assert [key(m) for _, m in seen] == [key(m) for _, m in whole.messages]
    assert len({key(m) for _, m in seen}) == len(seen) == 2 + 40 + 4 + 1
    steps = [m["step"] for _, m in seen if m["type"] == "metrics"]
    assert steps == list(range(1, 41)) and seen[-1][1]["status"] == "succeeded"


def test_a_row_that_gains_names_is_sent_again(live: Live) -> None:
    job = new_job(live.db)
    metrics(live.db, job, 5, loss=0.5)
    first = read(live, job, count=3)
    assert first.messages[-1][0] == "2.5.1"
    metrics(live.db, job, 5, **{"eval/loss": 0.4})
    finish(live.db, job)
    more = read(live, job, last_id="2.5.1")
    assert [(i, m["type"]) for i, m in more.messages] == [("2.5.2", "metrics"), ("3.5.2", "status")]
    assert more.messages[0][1]["values"] == {"loss": 0.5, "eval/loss": 0.4}
    assert [i for i, _ in read(live, job, last_id="2.5").messages] == ["3.5"]  # S.M = row M sent whole


def test_heartbeat_comments_while_idle(live: Live) -> None:
    job = new_job(live.db)
    got = read(live, job, seconds=HEARTBEAT_S * 3.5)
    assert len(got.messages) == 2 and not got.closed
    assert got.comments.count("keep-alive") >= 2


def test_cancel_reaches_viewers_and_ends_the_stream(live: Live) -> None:
    job = new_job(live.db, running=False)
    result: list[Sse] = []
    viewer = threading.Thread(target=lambda: result.append(read(live, job)))
    viewer.start()
    time.sleep(0.3)
    with live.db.write() as s:
        cancel_job(s, job)
    viewer.join(10)
    assert result and result[0].closed
    assert [m.get("status") for _, m in result[0].messages] == ["queued", "cancelled"]


def test_auth_and_project_scope(live: Live) -> None:
    job = new_job(live.db)
    finish(live.db, job)
    url = f"{live.url}/v1/jobs/{job}/events"
    r = httpx.get(url)
    assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json")
    assert httpx.get(url, headers={"Authorization": "Bearer nope"}).status_code == 401
    r = httpx.get(url, headers=auth("team-b"))
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
    assert httpx.get(f"{live.url}/v1/jobs/job_missing/events", headers=auth()).status_code == 404
    assert read(live, job, headers=auth("*")).closed  # the admin sees every project
    r = httpx.get(url, headers={**auth(), "Last-Event-ID": "x; drop table"})
    assert r.status_code == 400 and "Last-Event-ID" in r.json()["detail"]


def test_many_viewers_share_one_poller(live_any: Live) -> None:
    live = live_any
    job = new_job(live.db)
    hub = live.hub
    statements = 0

    def count(*_: Any) -> None:
        nonlocal statements
        statements += 1

    results: list[Sse] = []
    viewers = [threading.Thread(target=lambda: results.append(read(live, job))) for _ in range(5)]
    for v in viewers:
        v.start()
    deadline = time.monotonic() + 10
    while sum(len(f.subscribers) for f in hub.feeds.values()) < 5:
        assert time.monotonic() < deadline, "viewers did not subscribe"
        time.sleep(0.02)
    assert hub.feeds_started == 1 and list(hub.feeds) == [job]
    window = 1.0
    polls_before = hub.polls
    event.listen(live.db.engine, "before_cursor_execute", count)
    try:
        time.sleep(window)
    finally:
        event.remove(live.db.engine, "before_cursor_execute", count)
    polls = hub.polls - polls_before
    # One feed polling every POLL_S (one read transaction per poll), not one per viewer (5x as many).
    assert 0.3 * window / POLL_S <= polls <= 1.5 * window / POLL_S + 2
    assert statements <= 5 * (polls + 1), (statements, polls)  # ~4 statements a poll, BEGIN included
    metrics(live.db, job, 1, 2, 3)
    finish(live.db, job)
    for v in viewers:
        v.join(10)
    assert len(results) == 5 and all(r.closed for r in results)
    first = [i for i, _ in results[0].messages]
    assert len(first) == 6 and all([i for i, _ in r.messages] == first for r in results)
    assert hub.feeds == {} and hub.feeds_started == 1


def test_poller_stops_when_the_last_viewer_leaves(live: Live) -> None:
    job = new_job(live.db)
    for started in (1, 2):
        assert len(read(live, job, count=2).messages) == 2  # then disconnects
        deadline = time.monotonic() + 5
        while live.hub.feeds:
            assert time.monotonic() < deadline, "feed still running without viewers"
            time.sleep(0.02)
        assert live.hub.feeds_started == started
