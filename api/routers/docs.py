"""OpenAPI document and Swagger UI, served with vendored assets (works offline, no CDN)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from api.errors import ProblemError

STATIC = Path(__file__).resolve().parent.parent / "static" / "swagger-ui"
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
    "LICENSE.txt": "text/plain",
    "NOTICE.txt": "text/plain",
}

router = APIRouter(include_in_schema=False)


@router.get("/openapi.json")
async def openapi(request: Request) -> JSONResponse:
    """The OpenAPI 3.1 document of this API."""
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    """Swagger UI."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=f"{request.app.title} - API docs",
        swagger_js_url="/docs/assets/swagger-ui-bundle.js",
        swagger_css_url="/docs/assets/swagger-ui.css",
        swagger_favicon_url="/docs/assets/favicon-32x32.png",
        swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True},
    )


@router.get("/docs/assets/{name}")
async def docs_asset(name: str) -> FileResponse:
    """One vendored Swagger UI file (swagger-ui-dist, Apache-2.0)."""
    if name not in ASSETS:
        raise ProblemError(404, f"No docs asset named '{name}'")
    return FileResponse(
        STATIC / name, media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=86400"}
    )
