"""Client errors: an API problem (RFC 9457 body), an unreachable server, a wait that ran out of time."""

from __future__ import annotations

from typing import Any

import httpx


class ClientError(Exception):
    """Base of every error the client raises."""


class ServerUnreachableError(ClientError):
    """The server could not be reached (after the configured retries)."""


class WaitTimeoutError(ClientError):
    """`Client.wait` gave up before the job finished."""


class ApiError(ClientError):
    """The server answered with an error: status, `detail` and, for validation, one `{loc, msg}` per field."""

    def __init__(
        self, status: int, detail: str, *, title: str = "", errors: list[dict[str, Any]] | None = None
    ):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.title = title
        self.errors = errors or []

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        """Build from a problem+json body (or whatever text the server sent)."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            detail = body.get("detail")
            if not isinstance(detail, str):
                detail = body.get("title") or response.reason_phrase
            errors = body.get("errors") if isinstance(body.get("errors"), list) else None
            return cls(response.status_code, detail, title=str(body.get("title", "")), errors=errors)
        return cls(response.status_code, response.text.strip()[:500] or response.reason_phrase)
