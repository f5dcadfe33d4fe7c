"""SSE cursor (`<seq>.<step>.<names>`) and the one store read that turns a cursor into the next messages."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import select

from core.store import Database, list_events, metric_series
from core.store.models import TERMINAL_STATUSES, Job, JobEvent, MetricPoint

PAGE = 500
_CURSOR_RE = re.compile(r"^(\d{1,18})(?:\.(-1|\d{1,18})(?:\.(\d{1,9}))?)?$")
_ALL_NAMES = 1 << 30


@dataclass(frozen=True)
class Cursor:
    """How far a client has read: events up to `seq`, metric rows up to `step` (`names` of row `step`).

    `step` is -1 before any metric row. Formatted as the SSE id: ``<seq>`` while no metric row was
    sent, else ``<seq>.<step>.<names>``.
    """

    seq: int = 0
    step: int = -1
    names: int = 0

    def format(self) -> str:
        if self.step < 0:
            return str(self.seq)
        return (
            f"{self.seq}.{self.step}" if self.names >= _ALL_NAMES else f"{self.seq}.{self.step}.{self.names}"
        )

    @classmethod
    def parse(cls, text: str | None) -> Cursor:
        """Parse a Last-Event-ID; ``S.M`` (no names count) means row M was sent whole. ValueError if malformed."""
        if text is None or not text.strip():
            return cls()
        match = _CURSOR_RE.match(text.strip())
        if match is None:
            raise ValueError(
                f"Last-Event-ID {text!r} is not an id of this stream (<seq> or <seq>.<step>.<names>)"
            )
        seq, step, names = match.groups()
        if step is None or step == "-1":
            return cls(seq=int(seq))
        return cls(seq=int(seq), step=int(step), names=_ALL_NAMES if names is None else int(names))

    def takes(self, message: Message) -> bool:
        """Whether `message` is news for a client at this cursor (used to merge catch-up and live feeds)."""
        if message.kind == "metrics":
            return (message.step, message.names) > (self.step, self.names)
        return message.seq > self.seq

    def after(self, message: Message) -> Cursor:
        """The cursor once `message` is sent."""
        if message.kind == "metrics":
            return replace(self, step=message.step, names=message.names)
        return replace(self, seq=max(self.seq, message.seq))


@dataclass(frozen=True)
class Message:
    """One SSE message before its id is assigned: an event row (seq) or a metric row (step, names)."""

    kind: str  # "status" | "event" | "metrics"
    payload: dict[str, Any]
    time: float
    seq: int = 0
    step: int = -1
    names: int = 0
    final: bool = field(default=False)  # the status event that made the job terminal


@dataclass(frozen=True)
class Batch:
    """The result of one read: messages after a cursor, the cursor after them, and the job's state."""

    messages: list[Message]
    cursor: Cursor
    terminal: bool
    more: bool


def _event_message(event: JobEvent) -> Message:
    data = event.data or {}
    when = event.created_at.timestamp()
    base = {"seq": event.seq, "message": event.message, "time": when}
    if event.kind == "status":
        payload = {**base, "status": data.get("to"), "from": data.get("from"), "error": data.get("error")}
        final = data.get("to") in TERMINAL_STATUSES
        return Message("status", payload, when, seq=event.seq, final=final)
    payload = {**base, "kind": event.kind, "data": data}
    return Message("event", payload, when, seq=event.seq)


def read_after(db: Database, job_id: str, cursor: Cursor, page: int = PAGE) -> Batch:
    """Messages after `cursor`: up to `page` events and `page` metric rows, merged in time order.

    The job's status is read first, so when it is terminal every event and metric written before
    the final transition is visible to the reads that follow. The row at ``cursor.step`` is read
    again and re-sent (whole) if it gained names since (eval metrics reported for the same step).
    A terminal status event sorts after the rest of its batch.
    """
    with db.read() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        terminal = status is None or status in TERMINAL_STATUSES
        events = list_events(session, job_id, after_seq=cursor.seq, limit=page)
        rows = metric_series(session, job_id, after_step=max(cursor.step - 1, -1), limit=page + 1).data
    messages = [_event_message(e) for e in events]
    for row in rows:
        count = len(row.values)
        if row.step < cursor.step or (row.step == cursor.step and count <= cursor.names):
            continue
        payload = {"step": row.step, "time": row.time, "values": row.values}
        messages.append(Message("metrics", payload, row.time, step=row.step, names=count))
    messages.sort(key=lambda m: (m.final, m.time))
    more = len(events) >= page or len(rows) > page
    end = cursor
    for message in messages:
        end = end.after(message)
    return Batch(messages=messages, cursor=end, terminal=terminal, more=more)


def head(db: Database, job_id: str) -> tuple[Cursor, bool]:
    """The newest cursor stored for a job (where a new live feed starts) and whether the job is terminal."""
    with db.read() as session:
        job = session.execute(select(Job.status, Job.last_event_seq).where(Job.id == job_id)).one_or_none()
        top = session.execute(
            select(MetricPoint.step, MetricPoint.metrics)
            .where(MetricPoint.job_id == job_id)
            .order_by(MetricPoint.step.desc())
            .limit(1)
        ).one_or_none()
    if job is None:
        return Cursor(), True
    cursor = Cursor(seq=int(job.last_event_seq or 0))
    if top is not None:
        metrics = top.metrics if isinstance(top.metrics, dict) else {}
        cursor = replace(cursor, step=int(top.step), names=len(metrics))
    return cursor, job.status in TERMINAL_STATUSES
