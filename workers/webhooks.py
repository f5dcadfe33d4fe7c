"""Webhook sender: POSTs due outbox rows signed per Standard Webhooks, retries with backoff, logs job events."""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from urllib.parse import urlsplit

import httpx

from core.store import Database, append_event
from core.store.models import utcnow
from core.store.webhooks import DueDelivery, claim_due, record_failure, record_success
from core.webhooks import sign

log = logging.getLogger("workers.webhooks")


def redact(url: str) -> str:
    """Scheme and host only: webhook URLs often carry credentials in their path or query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}/..."


class WebhookSender:
    """Delivers pending webhooks: one signed POST per due row; 2xx = delivered, else retried with backoff."""

    def __init__(
        self,
        db: Database,
        secret_for: Callable[[str], str],
        *,
        max_attempts: int = 8,
        backoff_s: float = 2.0,
        backoff_max_s: float = 600.0,
        timeout_s: float = 10.0,
        batch: int = 5,
        client: httpx.Client | None = None,
        allow_private: bool = False,
    ) -> None:
        self.db = db
        self.secret_for = secret_for
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.batch = batch
        # a lease outlasts a whole batch (each request: connect + write + read timeouts)
        self.lease_s = batch * (timeout_s * 3 + 5)
        self.allow_private = allow_private
        self.client = client or httpx.Client(timeout=timeout_s, follow_redirects=False)

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with ±20% jitter: backoff_s, 2×, 4×, ... capped at backoff_max_s."""
        return min(self.backoff_s * 2 ** (attempt - 1), self.backoff_max_s) * random.uniform(0.8, 1.2)

    def _post(self, item: DueDelivery) -> str | None:
        """Send one delivery; None on a 2xx, else why it failed."""
        body = json.dumps(item.payload, separators=(",", ":"), sort_keys=True).encode()
        stamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "minordpo-webhooks/1",
            "webhook-id": item.message_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": sign(self.secret_for(item.project), item.message_id, stamp, body),
        }
        if (refused := self.address_policy(item.url)) is not None:
            return refused
        try:
            # the body is never read: a receiver cannot make the dispatcher buffer an endless answer
            with self.client.stream("POST", item.url, content=body, headers=headers) as response:
                status = response.status_code
        except httpx.TimeoutException:
            return "timed out"
        except httpx.HTTPError:
            return "connection failed"  # no details: they would map the internal network for tenants
        return None if 200 <= status < 300 else f"HTTP {status}"

    def _record(self, item: DueDelivery, error: str | None) -> None:
        attempt = item.attempts + 1
        data = {"url": item.url, "type": item.event_type, "attempt": attempt, "event_seq": item.event_seq}
        with self.db.write() as session:
            if error is None:
                if record_success(session, item):
                    append_event(
                        session,
                        item.job_id,
                        "webhook",
                        f"{item.event_type} delivered to {item.url}",
                        {**data, "outcome": "delivered"},
                        dedup_key=f"webhook:{item.id}:ok",
                    )
                return
            final = attempt >= self.max_attempts
            retry_at = None if final else utcnow() + timedelta(seconds=self._delay(attempt))
            if record_failure(session, item, error, retry_at=retry_at):
                outcome = "failed" if final else "retrying"
                note = "giving up" if final else f"retry in {(retry_at - utcnow()).total_seconds():.0f} s"  # type: ignore[operator]
                append_event(
                    session,
                    item.job_id,
                    "webhook",
                    f"{item.event_type} to {item.url}: {error}; {note}",
                    {**data, "outcome": outcome, "error": error},
                    dedup_key=f"webhook:{item.id}:{attempt}",
                )
        log.warning(
            "webhook %s to %s failed (attempt %d): %s", item.event_type, redact(item.url), attempt, error
        )

    def address_policy(self, url: str) -> str | None:
        """Why `url` must not be called (a loopback, private, link-local or reserved address), or None."""
        if self.allow_private:
            return None
        host = urlsplit(url).hostname or ""
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return "cannot resolve host"
        for info in infos:
            ip = ipaddress.ip_address(info[4][0])
            if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
                return "refused: the host resolves to a private address (MINORDPO_WEBHOOK_ALLOW_PRIVATE)"
        return None

    def tick(self) -> int:
        """Send what is due now; returns how many deliveries were attempted."""
        with self.db.write() as session:
            due = claim_due(session, limit=self.batch, lease_s=self.lease_s)
        for item in due:
            try:
                error = self._post(item)
            except Exception as exc:  # a malformed URL must not stall the rows claimed after it
                error = f"cannot send: {type(exc).__name__}"
            self._record(item, error)
        return len(due)

    def run(self, stop: threading.Event, interval_s: float) -> None:
        """Loop until `stop` is set; a failing pass is logged and the loop goes on."""
        while not stop.is_set():
            try:
                busy = self.tick() >= self.batch
            except Exception:
                log.exception("webhook pass failed")
                busy = False
            if not busy:
                stop.wait(interval_s)

    def close(self) -> None:
        self.client.close()
