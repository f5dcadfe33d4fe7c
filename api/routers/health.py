"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import get_principal
from api.errors import PROBLEM_JSON

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    """Always 200 while the process serves requests."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: the database (and Ray, where a check is registered) is reachable",
    responses={503: {"description": "A dependency is not reachable", "content": {PROBLEM_JSON: {}}}},
)
async def readyz(request: Request) -> JSONResponse:
    """Run every registered readiness check (`app.state.readiness_checks`, name -> callable raising on failure)."""
    checks: dict[str, Any] = {}
    failed: list[str] = []
    for name, check in request.app.state.readiness_checks.items():
        try:
            await run_in_threadpool(check)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"error: {exc.__class__.__name__}"
            failed.append(name)
    if failed:
        body = {
            "type": "about:blank",
            "title": "Service Unavailable",
            "status": 503,
            "detail": f"Not ready: {', '.join(failed)} unreachable",
            "instance": request.url.path,
            "checks": checks,
        }
        return JSONResponse(body, status_code=503, media_type=PROBLEM_JSON)
    return JSONResponse({"status": "ready", "checks": checks})


@router.get(
    "/metrics", summary="Prometheus metrics", response_class=Response, dependencies=[Depends(get_principal)]
)
async def metrics(request: Request) -> Response:
    """Request counts and latency by route template, and jobs by status."""
    payload = await run_in_threadpool(request.app.state.metrics.render)
    return Response(payload, media_type=CONTENT_TYPE_LATEST)
