"""Pure-ASGI middleware: request id + access log + metrics, bearer auth, request body size limits."""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import BodyTooLarge, problem_response
from api.logging import request_id_var
from api.metrics import ApiMetrics
from api.services.auth import Authenticator

access_log = logging.getLogger("api.access")
log = logging.getLogger("api")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    """Request id (accepted from X-Request-ID or generated, echoed back), access log line, metrics."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _REQUEST_ID.match(incoming) else secrets.token_hex(16)
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        status: dict[str, Any] = {"code": 500, "started": False}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["started"] = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not status["started"]:
                response = problem_response(
                    Request(scope),
                    500,
                    "Internal server error; quote the X-Request-ID header when reporting it",
                )
                await response(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            self.metrics.observe(scope.get("method", "GET"), template, status["code"], elapsed)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "%s %s %s",
                    scope.get("method"),
                    scope.get("path"),
                    status["code"],
                    extra={
                        "method": scope.get("method"),
                        "path": scope.get("path"),
                        "status": status["code"],
                        "duration_ms": round(elapsed * 1000, 2),
                        "request_id": request_id,
                    },
                )
            request_id_var.reset(token)


class AuthMiddleware:
    """Require a valid bearer token on every path except the public ones; put the principal in the state."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator, public_paths: set[str]) -> None:
        self.app = app
        self.auth = authenticator
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        path = scope.get("path", "")
        if not self.auth.enabled:
            state["principal"] = self.auth.open_principal()
        else:
            header = _header(scope, b"authorization")
            principal = await self.auth.authenticate(header)
            if principal is None and not self._public(path):
                if header:
                    detail, challenge = (
                        "The bearer token is not valid",
                        'Bearer realm="minordpo", error="invalid_token"',
                    )
                else:
                    detail, challenge = (
                        "Missing 'Authorization: Bearer <token>' header",
                        'Bearer realm="minordpo"',
                    )
                response = problem_response(
                    Request(scope), 401, detail, headers={"WWW-Authenticate": challenge}
                )
                await response(scope, receive, send)
                return
            state["principal"] = principal
        await self.app(scope, receive, send)

    def _public(self, path: str) -> bool:
        return path in self.public_paths or any(  # "/" is public as itself only, never as a prefix
            p.endswith("/") and p != "/" and path.startswith(p) for p in self.public_paths
        )


class BodyLimitMiddleware:
    """413 for bodies over the limit: by Content-Length up front, else counted while streaming."""

    def __init__(self, app: ASGIApp, default_limit: int, upload_limit: int, upload_paths: set[str]) -> None:
        self.app = app
        self.default_limit = default_limit
        self.upload_limit = upload_limit
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if scope.get("path") in self.upload_paths else self.default_limit
        length = _header(scope, b"content-length")
        if (
            length is None
            and scope.get("http_version") in ("1.0", "1.1")
            and _header(scope, b"transfer-encoding") is None
        ):  # HTTP/1.x without either header has no body (RFC 9112 6.3): nothing to count
            await self.app(scope, receive, send)
            return
        if length is not None and length.isdigit() and int(length) > limit:
            await self._reject(scope, receive, send, limit)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(scope, receive, send, limit)
        except Exception as exc:  # multipart parsers wrap errors raised while they read
            if isinstance(exc.__cause__ or exc.__context__, BodyTooLarge) and not started:
                await self._reject(scope, receive, send, limit)
            else:
                raise

    async def _reject(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        response = problem_response(
            Request(scope),
            413,
            str(BodyTooLarge(limit)),
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)
