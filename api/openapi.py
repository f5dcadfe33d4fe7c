"""The OpenAPI document as the contract: FastAPI's, plus the bearer scheme and the errors every operation can give."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

SCHEME = "bearer"
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
#: Answers the middleware and the body parsers give before a route runs, by status.
COMMON = {
    401: "Missing or invalid bearer token",
    400: "Malformed request: a body that is not valid JSON or multipart, or a cursor or header that is not one "
    "this API issued",
}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": PROBLEM_REF}}}


def _is_public(path: str, public_paths: Iterable[str]) -> bool:
    """The auth middleware's rule: exact paths, and prefixes ending in `/` other than `/` itself."""
    return any(path == p or (p.endswith("/") and p != "/" and path.startswith(p)) for p in public_paths)


def _takes_malformed_input(operation: dict[str, Any]) -> bool:
    """A body, or a query or header parameter the server parses itself (cursors, Last-Event-ID)."""
    if "requestBody" in operation:
        return True
    return any(p.get("in") in ("query", "header") for p in operation.get("parameters", []))


def contract_document(app: FastAPI, public_paths: Iterable[str]) -> dict[str, Any]:
    """FastAPI's document with the bearer security scheme, and 400/401 problems on every operation that can give them."""
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = document.setdefault("components", {})
    components.setdefault("securitySchemes", {})[SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "A project token from MINORDPO_API_TOKENS (PROJECT:TOKEN entries)",
    }
    public = list(public_paths)
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if _is_public(path, public):
                operation["security"] = []
            else:
                operation["security"] = [{SCHEME: []}]
                responses.setdefault("401", _problem(COMMON[401]))
            if _takes_malformed_input(operation):
                responses.setdefault("400", _problem(COMMON[400]))
    return document


def documented_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the document lists for the template `path` matches (a 405's Allow header); [] if none."""
    templates = getattr(app.state, "openapi_templates", None)
    if templates is None:
        templates = app.state.openapi_templates = [
            (re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template)) + "$"), sorted(ops))
            for template, ops in app.openapi().get("paths", {}).items()
        ]
    return sorted({m.upper() for regex, ops in templates if regex.match(path) for m in ops})


def install_contract(app: FastAPI, public_paths: Iterable[str]) -> Callable[[], dict[str, Any]]:
    """Make `app.openapi()` build (once) and return the contract document."""
    paths = list(public_paths)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = contract_document(app, paths)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return openapi
