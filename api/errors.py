"""RFC 9457 problem details: one exception type, the handlers and the error schema."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.openapi import documented_methods

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("api.errors")


class FieldError(BaseModel):
    """One invalid field: where (dotted path, e.g. `loss.beta`) and what is wrong."""

    loc: str
    msg: str


class Problem(BaseModel):
    """The body of every error response (`application/problem+json`)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[FieldError] | None = Field(None, description="Per-field errors for 422 responses")


class ProblemError(Exception):
    """Raise anywhere in a request to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        type_: str = "about:blank",
        title: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = headers
        self.type = type_
        self.title = title or HTTPStatus(status).phrase


class BodyTooLarge(Exception):
    """The request body passed its size limit while being read (BodyLimitMiddleware answers 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"Request body is larger than the limit of {limit} bytes")
        self.limit = limit


def not_found(what: str, ident: str) -> ProblemError:
    """404 for an object that does not exist or belongs to another project."""
    return ProblemError(404, f"{what} '{ident}' not found")


def invalid(loc: str, msg: str, detail: str | None = None) -> ProblemError:
    """422 for one bad field."""
    return ProblemError(422, detail or f"{loc}: {msg}", errors=[{"loc": loc, "msg": msg}])


def problem_response(
    request: Request,
    status: int,
    detail: str,
    *,
    errors: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
    type_: str = "about:blank",
    title: str | None = None,
) -> JSONResponse:
    """Build the JSON response for a problem (shared by handlers and middleware)."""
    body: dict[str, Any] = {
        "type": type_,
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def problem_from(request: Request, exc: ProblemError) -> JSONResponse:
    """The response for a raised ProblemError."""
    return problem_response(
        request,
        exc.status,
        exc.detail,
        errors=exc.errors,
        headers=exc.headers,
        type_=exc.type,
        title=exc.title,
    )


def validation_problem(request: Request, exc: ValidationError) -> JSONResponse:
    """The 422 for a pydantic ValidationError raised while answering (not a request-body error)."""
    errors = pydantic_errors(list(exc.errors()), skip_body=False)
    return problem_response(request, 422, summary(errors), errors=errors)


def _dotted(loc: tuple[Any, ...] | list[Any], skip_body: bool = True) -> str:
    parts = list(loc)
    if skip_body and parts and parts[0] == "body":
        parts = parts[1:]
    cleaned = [str(p) for p in parts if not (isinstance(p, str) and p.startswith("function-"))]
    return ".".join(cleaned) or "(body)"


def pydantic_errors(errors: list[Any], skip_body: bool = True) -> list[dict[str, str]]:
    """Map pydantic error dicts to `[{loc, msg}]` with dotted field paths."""
    out = []
    for err in errors:
        msg = str(err.get("msg", "invalid value"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        out.append({"loc": _dotted(err.get("loc", ()), skip_body), "msg": msg})
    return out


def summary(errors: list[dict[str, str]]) -> str:
    """A one-line `detail` naming the first few bad fields."""
    shown = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return f"Invalid request: {shown}{more}"


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error, expected or not, with problem+json."""

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_from(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = pydantic_errors(list(exc.errors()))
        for err in errors:
            if err["msg"].startswith("JSON decode error"):
                return problem_response(request, 400, "Request body is not valid JSON", errors=errors)
        return problem_response(request, 422, summary(errors), errors=errors)

    @app.exception_handler(ValidationError)
    async def _pydantic(request: Request, exc: ValidationError) -> JSONResponse:
        return validation_problem(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, BodyTooLarge):  # FastAPI wraps body-read errors in a 400
            return problem_response(request, 413, str(exc.__cause__), headers={"Connection": "close"})
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"No route for {request.url.path}"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            allowed = documented_methods(request.app, request.url.path) or (headers or {}).get("Allow", "")
            if isinstance(allowed, list):
                allowed = ", ".join(allowed)
            headers = {**(headers or {}), "Allow": allowed}
            if detail == "Method Not Allowed":
                detail = f"Method {request.method} is not allowed on {request.url.path} (allowed: {allowed})"
        return problem_response(request, exc.status_code, detail, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(
            request, 500, "Internal server error; the request id in X-Request-ID locates the log"
        )
