"""Webhooks per Standard Webhooks (standardwebhooks.com): which job events are sent, secrets and signatures."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SECRET_PREFIX = "whsec_"
SECRET_FILE = "webhook-secret"
STATUS_EVENTS = {
    "running": "job.started",
    "succeeded": "job.succeeded",
    "failed": "job.failed",
    "cancelled": "job.cancelled",
}


def webhook_type(kind: str, data: Mapping[str, Any] | None) -> str | None:
    """The webhook event type of a stored job event (status moves and checkpoints), or None."""
    if kind == "status" and data is not None:
        return STATUS_EVENTS.get(str(data.get("to")))
    if kind == "checkpoint":
        return "job.checkpoint"
    return None


def master_secret(configured: str | None, artifacts_dir: Path) -> bytes:
    """The operator's secret (MINORDPO_WEBHOOK_SECRET), else one generated once in the artifacts dir (mode 0600).

    Processes that share the artifacts dir (api, dispatcher) share the generated secret; creation uses
    O_EXCL so two processes starting together agree on one value.
    """
    if configured:
        return configured.encode()
    path = artifacts_dir / SECRET_FILE
    if not path.exists():
        # written whole to a private temp file, then linked into place: readers never see a partial
        # secret, and of two processes racing, the first link wins and both read that one
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_urlsafe(32).encode())
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    value = path.read_bytes().strip()
    if len(value) < 32:
        raise ValueError(
            f"{path} holds no usable webhook secret (under 32 bytes): delete it or set MINORDPO_WEBHOOK_SECRET"
        )
    return value


def project_secret(master: bytes, project: str) -> str:
    """A project's signing secret, `whsec_<base64 key>`, derived from the master secret (one per tenant)."""
    key = hmac.new(master, f"minordpo-webhooks:{project}".encode(), hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(key).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: Mapping[str, str], body: bytes, *, tolerance_s: int = 300, now: int) -> bool:
    """Whether headers carry a valid v1 signature of `body` made within `tolerance_s` of `now`."""
    msg_id, stamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    if not msg_id or not stamp.isdigit() or abs(now - int(stamp)) > tolerance_s:
        return False
    expected = sign(secret, msg_id, int(stamp), body).encode()
    return any(
        hmac.compare_digest(expected, part.encode())
        for part in headers.get("webhook-signature", "").split()
        if part.startswith("v1,")
    )
