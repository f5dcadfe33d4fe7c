"""`Client`: typed calls for every route of MinorDPO Service, with retries, iterators and `wait`.

Schemas are the server's own (core.spec.JobSpec for requests, core.schemas for responses), so a
field renamed on the server is a type error here, not a silent KeyError.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx

from core.schemas import (
    CheckpointList,
    DatasetOut,
    EventOut,
    EventPage,
    JobGenerations,
    JobOut,
    JobPage,
    MetricSeries,
    ValidationOut,
    WebhookSecretOut,
)
from core.spec import JobSpec
from minordpo_client.errors import ApiError, ClientError, ServerUnreachableError, WaitTimeoutError
from minordpo_client.sse import StreamMessage, parse_sse, to_message

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
SpecLike = JobSpec | Mapping[str, Any]
Item = TypeVar("Item")


def spec_body(spec: SpecLike) -> dict[str, Any]:
    """Validate a spec locally (same rules as the server) and return the JSON body to send."""
    if isinstance(spec, JobSpec):
        return spec.model_dump(mode="json", exclude_unset=True)
    JobSpec.model_validate(spec)
    return dict(spec)


def _chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(size):
            yield chunk


def _follow_pages(fetch: Callable[[Any], tuple[list[Item], Any]], cursor: Any) -> Iterator[Item]:
    """Yield every item of a cursor-paginated listing: `fetch(cursor)` gives (items, next cursor or None)."""
    while True:
        items, cursor = fetch(cursor)
        yield from items
        if cursor is None or not items:
            return


class Client:
    """A synchronous client. `url`/`token` default to MINORDPO_URL / MINORDPO_TOKEN.

    Connection errors and 429/5xx answers are retried `retries` times with exponential backoff
    (honouring Retry-After). Every route is safe to retry: creates carry an Idempotency-Key (one is
    generated when none is given), uploads are content-addressed, the rest are reads or idempotent.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.url = (url or os.environ.get("MINORDPO_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("MINORDPO_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries = retries
        self.backoff = backoff
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- transport -------------------------------------------------------------------------------

    def _sleep_before_retry(self, attempt: int, response: httpx.Response | None) -> None:
        delay = self.backoff * 2**attempt * random.uniform(0.8, 1.2)
        if response is not None and (after := response.headers.get("retry-after", "")).isdigit():
            delay = max(delay, float(after))
        time.sleep(min(delay, 30.0))

    def request(
        self, method: str, path: str, *, content: Callable[[], Any] | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send with retries; returns a 2xx response or raises ApiError / ServerUnreachableError."""
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                body = {"content": content()} if content is not None else {}
                response = self._http.request(method, path, **body, **kwargs)
            except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
                raise ClientError(f"bad server URL {self.url!r}: {exc}") from exc
            except httpx.TransportError as exc:
                if last:
                    raise ServerUnreachableError(
                        f"cannot reach {self.url}: {exc or type(exc).__name__}"
                    ) from exc
                self._sleep_before_retry(attempt, None)
                continue
            if response.status_code in RETRY_STATUSES and not last:
                self._sleep_before_retry(attempt, response)
                continue
            if response.status_code >= 400:
                raise ApiError.from_response(response)
            return response
        raise AssertionError("unreachable")

    def _get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=clean).json()

    # -- health ----------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """`GET /healthz`: the process answers."""
        return self._get("/healthz")

    def ready(self) -> dict[str, Any]:
        """`GET /readyz`: database and Ray reachable (raises ApiError 503 when not)."""
        return self._get("/readyz")

    # -- jobs ------------------------------------------------------------------------------------

    def create_job(self, spec: SpecLike, *, idempotency_key: str | None = None) -> JobOut:
        """Queue a job; a retried or repeated call with the same key returns the same job."""
        key = idempotency_key or f"client-{uuid.uuid4()}"
        response = self.request("POST", "/v1/jobs", json=spec_body(spec), headers={"Idempotency-Key": key})
        return JobOut.model_validate(response.json())

    def validate_job(self, spec: SpecLike) -> ValidationOut:
        """Dry run: spec, paths and dataset checks, nothing queued."""
        return ValidationOut.model_validate(
            self.request("POST", "/v1/jobs:validate", json=spec_body(spec)).json()
        )

    def list_jobs(
        self,
        *,
        status: str | None = None,
        group: str | None = None,
        limit: int = 50,
        after: str | None = None,
    ) -> JobPage:
        """One page of jobs, newest first."""
        return JobPage.model_validate(
            self._get("/v1/jobs", status=status, group=group, limit=limit, after=after)
        )

    def iter_jobs(
        self, *, status: str | None = None, group: str | None = None, page_size: int = 100
    ) -> Iterator[JobOut]:
        """Every matching job once, newest first, following `next_cursor` page by page."""

        def page(after: str | None) -> tuple[list[JobOut], str | None]:
            got = self.list_jobs(status=status, group=group, limit=page_size, after=after)
            return got.data, got.next_cursor

        return _follow_pages(page, None)

    def get_job(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._get(f"/v1/jobs/{job_id}"))

    def cancel_job(self, job_id: str) -> JobOut:
        """Request cancellation (idempotent)."""
        return JobOut.model_validate(self.request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def metrics(
        self,
        job_id: str,
        *,
        names: list[str] | None = None,
        after_step: int | None = None,
        max_points: int | None = None,
        limit: int | None = None,
    ) -> MetricSeries:
        """Metric rows `{step, time, <name>: value}` (downsampled with `max_points`)."""
        joined = ",".join(names) if names else None
        return MetricSeries.model_validate(
            self._get(
                f"/v1/jobs/{job_id}/metrics",
                names=joined,
                after_step=after_step,
                max_points=max_points,
                limit=limit,
            )
        )

    def iter_metrics(self, job_id: str, *, names: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Every stored metric row of a job, in step order, page by page."""

        def page(after: int | None) -> tuple[list[dict[str, Any]], int | None]:
            got = self.metrics(job_id, names=names, after_step=after)
            return got.data, got.next_after_step

        return _follow_pages(page, None)

    def checkpoints(self, job_id: str) -> CheckpointList:
        return CheckpointList.model_validate(self._get(f"/v1/jobs/{job_id}/checkpoints"))

    def generations(self, job_id: str, *, step: int | None = None) -> JobGenerations:
        """Eval generations at `step` (default: the latest eval step that has them) and every such step."""
        return JobGenerations.model_validate(self._get(f"/v1/jobs/{job_id}/generations", step=step))

    def list_events(self, job_id: str, *, after: int = 0, limit: int = 100) -> EventPage:
        """Stored events after seq `after`, oldest first (no waiting; `events()` follows live)."""
        response = self.request(
            "GET",
            f"/v1/jobs/{job_id}/events",
            params={"after": after, "limit": limit},
            headers={"Accept": "application/json"},
        )
        return EventPage.model_validate(response.json())

    def iter_stored_events(self, job_id: str) -> Iterator[EventOut]:
        """Every stored event of a job, oldest first, page by page."""

        def page(after: int | None) -> tuple[list[EventOut], int | None]:
            got = self.list_events(job_id, after=after or 0)
            return got.data, got.next_after

        return _follow_pages(page, None)

    # -- datasets, webhooks ----------------------------------------------------------------------

    def upload_dataset(self, path: str | Path) -> DatasetOut:
        """Upload a preference file (streamed); the same bytes uploaded twice give the same id."""
        source = Path(path)
        response = self.request(
            "POST",
            "/v1/datasets",
            content=lambda: _chunks(source),
            params={"filename": source.name},
            headers={"content-type": "application/octet-stream"},
            timeout=httpx.Timeout(30.0, read=600.0),
        )
        return DatasetOut.model_validate(response.json())

    def get_dataset(self, dataset_id: str) -> DatasetOut:
        return DatasetOut.model_validate(self._get(f"/v1/datasets/{dataset_id}"))

    def webhook_secret(self) -> WebhookSecretOut:
        """The `whsec_...` secret that signs this project's webhook deliveries."""
        return WebhookSecretOut.model_validate(self._get("/v1/webhooks/secret"))

    # -- streaming -------------------------------------------------------------------------------

    def events(
        self, job_id: str, *, last_event_id: str | None = None, heartbeats: bool = False
    ) -> Iterator[StreamMessage]:
        """A job's stream (status, events, metric rows) until it ends; reconnects with Last-Event-ID.

        A dropped connection is resumed from the last message received, so nothing is skipped or
        repeated; the iterator ends after the terminal status (or at once for a finished job whose
        stream was read to its end before). With `heartbeats`, the server's keep-alives are yielded
        too, as messages of type ``heartbeat``.
        """
        failures = 0
        retry_ms = 2000
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            try:
                with self._http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers=headers,
                    timeout=httpx.Timeout(30.0, read=90.0),
                ) as response:
                    if response.status_code == 204:
                        return
                    if response.status_code in RETRY_STATUSES:
                        raise httpx.ReadError(f"HTTP {response.status_code}")  # a restart: retry like a drop
                    if response.status_code >= 400:
                        response.read()
                        raise ApiError.from_response(response)
                    for event_id, data, retry in parse_sse(response.iter_lines()):
                        retry_ms = retry or retry_ms
                        if data is None:
                            if heartbeats:
                                yield StreamMessage(id=None, type="heartbeat", data={})
                            continue
                        message = to_message(event_id, data)
                        last_event_id = event_id or last_event_id
                        failures = 0
                        yield message
                        if message.is_terminal_status:
                            return
            except httpx.TransportError as exc:
                failures += 1
                if failures > self.retries:
                    raise ServerUnreachableError(f"event stream of {job_id} lost: {exc}") from exc
            time.sleep(min(retry_ms / 1000 * (2 ** max(failures - 1, 0)), 30.0))

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_message: Callable[[StreamMessage], None] | None = None,
    ) -> JobOut:
        """Block until the job is succeeded, failed or cancelled; returns the final job.

        Follows the event stream (passing each message to `on_message`) and falls back to polling if
        the stream is unavailable. Raises WaitTimeoutError after `timeout` seconds (checked at each
        message and keep-alive, so within the server's heartbeat interval, 15 s by default).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get_job(job_id)
        if job.status in TERMINAL:
            return job
        # Replay events from the start but metric rows only from the latest one (a long job has many).
        resume = f"0.{job.progress.step - 1}" if job.progress.step > 0 else None
        try:
            for message in self.events(job_id, last_event_id=resume, heartbeats=True):
                if on_message is not None and message.type != "heartbeat":
                    on_message(message)
                if message.is_terminal_status:
                    return self.get_job(job_id)
                if deadline is not None and time.monotonic() > deadline:
                    status = self.get_job(job_id).status
                    raise WaitTimeoutError(f"job {job_id} still {status} after {timeout:g} s")
        except ServerUnreachableError:
            pass  # the stream is gone for now: poll instead
        while (job := self.get_job(job_id)).status not in TERMINAL:
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeoutError(f"job {job_id} still {job.status} after {timeout:g} s")
            time.sleep(2.0 if deadline is None else max(0.0, min(2.0, deadline - time.monotonic())))
        return job
