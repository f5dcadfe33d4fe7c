"""GET /v1/jobs/{job_id}, the API's hottest read, answered in front of the router with the route's own answer."""

from __future__ import annotations

import re

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import ProblemError, problem_from, validation_problem
from api.routers import jobs
from api.services import jobs as service
from core.store import Database

JOB_ROUTE = "/v1/jobs/{job_id}"
# The route's job_id: one path segment of at most 64 characters. A longer one goes on to the route,
# whose validation answers 422.
_JOB_PATH = re.compile(r"/v1/jobs/([^/]{1,64})")


def job_route() -> BaseRoute:
    """The GET route this fast path stands in for (its template labels the request metrics)."""
    return next(
        route
        for route in jobs.router.routes
        if getattr(route, "path", None) == JOB_ROUTE and "GET" in (getattr(route, "methods", None) or ())
    )


class JobReadFastPath:
    """Answers GET /v1/jobs/{job_id} with the same service call and body as the route, without FastAPI's
    routing, dependency solving and exception layers: on 2 cores those cost as much as the read itself.

    Sits inside the request-context, auth and body-limit middleware, so the request id, access log,
    metrics, bearer check and size limit are the same as for every route. Anything else goes on to
    the app. Not installed when MINORDPO_OTEL is on (FastAPI's spans name the route in the router)."""

    def __init__(self, app: ASGIApp, db: Database, route: BaseRoute) -> None:
        self.app = app
        self.db = db
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = (
            _JOB_PATH.fullmatch(scope["path"])
            if scope["type"] == "http" and scope["method"] == "GET"
            else None
        )
        principal = scope.get("state", {}).get("principal") if match else None
        if principal is None:  # not this route, or no principal yet: the app answers as usual
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        try:
            job = await service.get_async(self.db, principal, match[1])
        except ProblemError as exc:
            response: Response = problem_from(Request(scope), exc)
        except ValidationError as exc:  # answered as the app's handler answers it
            response = validation_problem(Request(scope), exc)
        else:
            response = Response(job.model_dump_json(), media_type="application/json")
        await response(scope, receive, send)
