"""`GET /v1/jobs/{id}/events`: a job's status changes, events and metric rows as Server-Sent Events.

Message data is JSON with a `type`:

- ``status``: ``{type, seq, status, from, message, error, time}`` (a lifecycle move),
- ``event``: ``{type, seq, kind, message, data, time}`` (checkpoint, warning, retry, cancel_requested...),
- ``metrics``: ``{type, step, time, values: {name: number | null}}`` (one metric row, every name of the step).

Event ids. Events carry a per-job `seq` (commit order); metric rows are keyed by `step` and are not
events, so every message's id is the reader's whole position after it: ``<seq>`` while no metric
row has been sent, then ``<seq>.<step>.<names>`` = (highest event seq sent, highest metric step
sent, how many names of that step's row were sent). Each message raises exactly one component and
none ever falls, so ids are ordered by the tuple. Resume rule for ``Last-Event-ID: S.M.N``: events
with seq > S, metric rows with step > M, and row M again (whole) if it now has more than N names
(eval metrics reported for a step already sent). ``S`` alone = no metric rows yet (all of them
follow); ``S.M`` = row M was sent whole. Both tables commit in increasing key order per job (the
store locks the job row), so resuming neither skips nor repeats a message.

The stream starts with a ``retry`` hint, sends a comment line (``: keep-alive``) after
`heartbeat` seconds without news (15 s; ``MINORDPO_SSE_HEARTBEAT_S``), and ends once the job is
terminal and everything up to its final status was sent. Reconnecting to a finished job with an
id at its end gets ``204 No Content`` (EventSource then stops reconnecting). One poller per job
serves all its viewers (api.services.stream.StreamHub).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.deps import DbDep, PrincipalDep
from api.errors import ProblemError, not_found
from api.routers.jobs import MAX_INT64, PROBLEMS
from api.services import jobs as jobs_service
from api.services.stream import StreamHub
from api.services.stream_reads import Cursor, Message
from core.schemas import EventPage
from core.store import get_job
from core.store.models import TERMINAL_STATUSES

router = APIRouter(prefix="/v1", tags=["jobs"], responses=PROBLEMS)
RETRY_MS = 2000
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def get_hub(request: Request) -> StreamHub:
    """The app's StreamHub, created on first use (tests may replace `app.state.stream_hub`)."""
    hub = getattr(request.app.state, "stream_hub", None)
    if hub is None:
        hub = request.app.state.stream_hub = StreamHub(request.app.state.db)
    return hub


def frame(message: Message, cursor: Cursor) -> str:
    """One SSE message: its id (the cursor after it) and one JSON data line."""
    data = json.dumps({"type": message.kind, **message.payload}, separators=(",", ":"), allow_nan=False)
    return f"id: {cursor.format()}\ndata: {data}\n\n"


async def _frames(hub: StreamHub, job_id: str, cursor: Cursor, terminal: bool) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n: stream of {job_id}\n\n"
    async for message in hub.stream(job_id, cursor, terminal):
        if message is None:
            yield ": keep-alive\n\n"
            continue
        cursor = cursor.after(message)
        yield frame(message, cursor)


@router.get(
    "/jobs/{job_id}/events",
    summary="Live events of a job (Server-Sent Events)",
    response_class=StreamingResponse,
    responses={
        200: {
            "model": EventPage,
            "content": {"text/event-stream": {}},
            "description": "The event stream; with `Accept: application/json` (and not text/event-stream), "
            "one page of stored events instead (`after`, `limit`)",
        },
        204: {"description": "The job is finished and the Last-Event-ID is at its end"},
        400: {"description": "Malformed Last-Event-ID"},
    },
)
async def job_events(
    request: Request,
    job_id: Annotated[str, Path(max_length=64, description="Job id")],
    db: DbDep,
    principal: PrincipalDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)] = None,
    after: Annotated[int, Query(ge=0, le=MAX_INT64, description="JSON view only: events after this seq")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="JSON view only: page size")] = 100,
) -> Response:
    """Status changes, events and metric rows in order, each with a resumable id (see the module docs)."""
    accept = request.headers.get("accept", "")
    if "application/json" in accept and "text/event-stream" not in accept:
        page = await to_thread.run_sync(
            lambda: jobs_service.events(db, principal, job_id, after=after, limit=limit)
        )
        return JSONResponse(page.model_dump(mode="json"))
    try:
        cursor = Cursor.parse(last_event_id)
    except ValueError as exc:
        raise ProblemError(
            400, str(exc), errors=[{"loc": "header.Last-Event-ID", "msg": "malformed id"}]
        ) from exc
    hub = get_hub(request)

    def visible() -> str | None:
        with db.read() as session:
            job = get_job(session, job_id, project=principal.scope)
            return None if job is None else job.status

    status = await to_thread.run_sync(visible)
    if status is None:
        raise not_found("job", job_id)
    terminal = status in TERMINAL_STATUSES
    if terminal and last_event_id:
        batch = await hub.read(job_id, cursor)
        if not batch.messages:
            return Response(status_code=204)
    return StreamingResponse(
        _frames(hub, job_id, cursor, terminal), media_type="text/event-stream", headers=HEADERS
    )
