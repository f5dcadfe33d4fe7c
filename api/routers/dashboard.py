"""The dashboard: `GET /` (a static single-page app), its assets and the vendored chart library."""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from api.errors import ProblemError

STATIC = Path(__file__).resolve().parent.parent / "static"
AREAS = ("dashboard", "vendor")
#: Paths the dashboard needs without a token (they hold no data; the API itself stays protected).
PUBLIC_PATHS = {"/", "/dashboard/config.json", "/static/dashboard/", "/static/vendor/"}
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    """The dashboard page."""
    return FileResponse(STATIC / "dashboard" / "index.html", media_type="text/html", headers=NO_CACHE)


@router.get("/dashboard/config.json")
async def config(request: Request) -> JSONResponse:
    """What the page needs before it has a token: whether the API asks for one."""
    return JSONResponse({"auth": bool(request.app.state.authenticator.enabled)}, headers=NO_CACHE)


@router.get("/static/{area}/{path:path}")
async def asset(area: str, path: str) -> FileResponse:
    """A file of the dashboard or of a vendored library (no directory listing, no path escapes)."""
    root = (STATIC / area).resolve()
    target = (root / path).resolve()
    if area not in AREAS or not target.is_relative_to(root) or not target.is_file():
        raise ProblemError(404, f"No static file '{area}/{path}'")
    media_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    if target.suffix == ".js":
        media_type = "text/javascript"
    return FileResponse(target, media_type=media_type, headers=NO_CACHE)
