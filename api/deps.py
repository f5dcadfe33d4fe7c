"""FastAPI dependencies: settings, database, the authenticated principal (async: no I/O, no thread-pool hop)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import ProblemError
from api.services.auth import Principal
from core.settings import Settings
from core.store import Database

# Declares the scheme in OpenAPI (Swagger's "Authorize" button); AuthMiddleware does the checking.
bearer_scheme = HTTPBearer(auto_error=False, description="API token from MINORDPO_API_TOKENS")


async def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


async def get_db(request: Request) -> Database:
    """The app's database (sessions are opened per unit of work by the services)."""
    return request.app.state.db


async def get_principal(
    request: Request, _credentials: HTTPAuthorizationCredentials | None = Security(bearer_scheme)
) -> Principal:
    """The caller, as authenticated by AuthMiddleware."""
    principal = getattr(request.state, "principal", None)
    if principal is None:  # only reachable on a public path called without a token
        raise ProblemError(
            401,
            "Missing 'Authorization: Bearer <token>' header",
            headers={"WWW-Authenticate": 'Bearer realm="minordpo"'},
        )
    return principal


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[Database, Depends(get_db)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
