"""Server-Sent Events parsing for the job event stream (`GET /v1/jobs/{id}/events`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StreamMessage:
    """One message of a job's stream: its id (the resume position), `type` and JSON payload."""

    id: str | None
    type: str
    data: dict[str, Any]

    @property
    def is_terminal_status(self) -> bool:
        """A status message announcing succeeded, failed or cancelled (the stream's last message)."""
        return self.type == "status" and self.data.get("status") in {"succeeded", "failed", "cancelled"}


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str | None, str | None, int | None]]:
    """Yield (id, data, retry_ms) per dispatched event of an SSE line stream; a comment (keep-alive) yields data None."""
    event_id: str | None = None
    data: list[str] = []
    retry: int | None = None
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                yield event_id, "\n".join(data), retry
            data = []  # the retry hint persists: the server sends it in a block of its own
            continue
        if line.startswith(":"):
            yield event_id, None, None
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            event_id = value
        elif name == "data":
            data.append(value)
        elif name == "retry" and value.isdigit():
            retry = int(value)


def to_message(event_id: str | None, data: str) -> StreamMessage:
    """Decode one data payload (JSON with a `type`) into a StreamMessage."""
    payload = json.loads(data)
    return StreamMessage(id=event_id, type=str(payload.pop("type", "message")), data=payload)
