"""Webhook outbox: enqueue deliveries with the job event that causes them, claim due ones, record outcomes."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, aliased

from core.spec import WEBHOOK_EVENTS
from core.store.models import Job, JobEvent, WebhookDelivery, utcnow
from core.webhooks import webhook_type


def enqueue_for_event(session: Session, job: Job, event: JobEvent) -> int:
    """Queue one delivery per webhook of the job's spec that wants this event; returns how many.

    Runs in the transaction that appends the event, so an event and its deliveries commit together.
    """
    kind = webhook_type(event.kind, event.data)
    hooks = (job.spec or {}).get("webhooks") or []
    if kind is None or not hooks:
        return 0
    payload = {
        "type": kind,
        "timestamp": event.created_at.isoformat().replace("+00:00", "Z"),
        "data": {
            "job_id": job.id,
            "name": job.name,
            "project": job.project,
            "group": job.group_id,
            "status": job.status,
            "event_seq": event.seq,
            "message": event.message,
            "error": job.error,
            "progress": {"step": job.step or 0, "total_steps": job.total_steps},
            "metrics": job.latest_metrics,
            "checkpoint": {"step": event.data.get("step")}
            if event.kind == "checkpoint" and event.data
            else None,
        },
    }
    wanted = [h["url"] for h in hooks if kind in h.get("events", WEBHOOK_EVENTS)]
    urls = list(dict.fromkeys(wanted))  # one delivery per URL, even if a stored spec lists it twice
    for url in urls:
        session.add(
            WebhookDelivery(
                job_id=job.id,
                event_seq=event.seq,
                event_type=kind,
                url=url,
                payload=payload,
                status="pending",
                attempts=0,
                next_attempt_at=event.created_at,
                created_at=event.created_at,
            )
        )
    count = len(urls)
    if count:
        session.flush()
    return count


@dataclass(frozen=True)
class DueDelivery:
    """A delivery claimed for sending: everything the sender needs, detached from the session."""

    id: int
    job_id: str
    project: str
    event_seq: int
    event_type: str
    url: str
    payload: dict[str, Any]
    attempts: int
    claim_token: str = ""

    @property
    def message_id(self) -> str:
        """The `webhook-id`: the same for every retry of this message, so receivers can deduplicate."""
        return f"msg_{self.job_id}_{self.event_seq}"


def claim_due(
    session: Session, *, now: datetime | None = None, limit: int = 20, lease_s: float = 60.0
) -> list[DueDelivery]:
    """Pending deliveries whose time has come, leased for `lease_s` so no other sender takes them meanwhile.

    Per job and URL, messages go out in order: a delivery waits while an earlier one to the same URL
    is still pending (being retried). Rows are locked with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL
    (SQLite serialises writers), so two dispatchers never claim the same delivery.
    """
    now = now or utcnow()
    earlier = aliased(WebhookDelivery)
    blocked = (
        select(earlier.id)
        .where(
            earlier.job_id == WebhookDelivery.job_id,
            earlier.url == WebhookDelivery.url,
            earlier.status == "pending",
            earlier.id < WebhookDelivery.id,
        )
        .exists()
    )
    rows = session.execute(
        select(WebhookDelivery, Job.project)
        .join(Job, Job.id == WebhookDelivery.job_id)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now, ~blocked)
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=WebhookDelivery)
    ).all()
    claimed = []
    token = secrets.token_hex(8)
    for row, project in rows:
        row.next_attempt_at = now + timedelta(seconds=lease_s)
        row.claim_token = token
        claimed.append(
            DueDelivery(
                row.id,
                row.job_id,
                project,
                row.event_seq,
                row.event_type,
                row.url,
                dict(row.payload),
                row.attempts,
                token,
            )
        )
    session.flush()
    return claimed


def _mine(item: DueDelivery) -> Any:
    """Rows still pending and still claimed by this sender (a lapsed lease re-claimed elsewhere is not ours)."""
    return (
        (WebhookDelivery.id == item.id)
        & (WebhookDelivery.status == "pending")
        & (WebhookDelivery.claim_token == item.claim_token)
    )


def record_success(session: Session, item: DueDelivery) -> bool:
    """Mark a delivery delivered (never sent again); False if it was no longer this sender's claim."""
    now = utcnow()
    result = session.execute(
        update(WebhookDelivery)
        .where(_mine(item))
        .values(status="delivered", attempts=WebhookDelivery.attempts + 1, delivered_at=now, last_error=None)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def record_failure(session: Session, item: DueDelivery, error: str, *, retry_at: datetime | None) -> bool:
    """Count a failed attempt; retry at `retry_at`, or give up (status failed) when it is None."""
    values: dict[str, Any] = {"attempts": WebhookDelivery.attempts + 1, "last_error": error[:2000]}
    if retry_at is None:
        values["status"] = "failed"
    else:
        values["next_attempt_at"] = retry_at
    result = session.execute(update(WebhookDelivery).where(_mine(item)).values(**values))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def list_deliveries(session: Session, job_id: str) -> list[WebhookDelivery]:
    """A job's deliveries in the order they were queued."""
    return list(
        session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.id)
        )
    )
