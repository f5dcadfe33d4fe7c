"""The FastAPI app factory: `create_app(settings)` wires settings, database, auth, middleware and routers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from sqlalchemy import text

from api.errors import install_error_handlers
from api.hot_path import JobReadFastPath, job_route
from api.logging import configure_logging
from api.metrics import ApiMetrics
from api.middleware import AuthMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from api.openapi import install_contract
from api.routers import dashboard, datasets, docs, health, jobs, stream, webhooks
from api.services.auth import Authenticator, StartupError
from api.services.datasets import datasets_dir
from api.services.hub_loads import HubLoads
from api.services.jobs import count_by_status
from api.services.uploads import remove_orphaned_uploads
from api.services.validation import TokenizerCache
from core.settings import Settings, get_settings
from core.store import Database, SchemaOutOfDateError, ensure_schema_current

log = logging.getLogger("api")
PUBLIC_PATHS = {"/healthz", "/readyz"}
DOCS_PATHS = {"/docs", "/openapi.json", "/docs/assets/"}
UPLOAD_PATHS = {"/v1/datasets"}
DESCRIPTION = """Preference-optimization training jobs (MinorDPO and the DPO family) on Ray Train.

Authenticate with `Authorization: Bearer <token>` (tokens from `MINORDPO_API_TOKENS`). Errors are
`application/problem+json` (RFC 9457) with a `detail` and, for invalid input, `errors: [{loc, msg}]`.
"""


def _version() -> str:
    try:
        return version("minordpo-service")
    except PackageNotFoundError:
        return "0.0.0"


def _database_check(db: Database) -> Callable[[], None]:
    def check() -> None:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    return check


def create_app(settings: Settings | None = None, *, database: Database | None = None) -> FastAPI:
    """Build the app. Raises api.services.auth.StartupError for a configuration that must not serve.

    The database must be at the schema head (or MINORDPO_AUTO_MIGRATE set); `minordpo serve` also
    creates a fresh SQLite file first. Extra
    readiness checks (e.g. Ray) go in `app.state.readiness_checks[name] = callable`; more public
    paths (e.g. a dashboard page) in `app.state.public_paths`; callables to run at shutdown in
    `app.state.shutdown_hooks`.
    """
    settings = settings or get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json, log_format=settings.log_format)
    db = database or Database(settings.database_url)
    try:
        ensure_schema_current(db.engine, settings.auto_migrate)
    except SchemaOutOfDateError as exc:
        raise StartupError(str(exc)) from exc
    authenticator = Authenticator.from_settings(settings, db)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for path in remove_orphaned_uploads(datasets_dir(settings.artifacts_dir)):  # of a killed upload
            log.info("removed the orphaned temporary upload %s", path.name)
        log.info("API ready (auth %s)", "on" if authenticator.enabled else "off: loopback only")
        yield
        try:
            for hook in app.state.shutdown_hooks:  # e.g. the embedded dispatcher and its local Ray head
                await asyncio.to_thread(hook)
        finally:
            await db.close_async_reads()  # bound to this event loop
            if database is None:
                db.dispose()

    app = FastAPI(
        title="MinorDPO Service",
        version=_version(),
        description=DESCRIPTION,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        # Off by default: the service exports Prometheus metrics itself, and looking up the global
        # OpenTelemetry providers on every request costs a measurable share of a GET (bench/API.md).
        telemetry={"tracing": settings.otel, "metrics": settings.otel, "logs": settings.otel},
    )
    metrics = ApiMetrics()
    metrics.track_jobs(lambda: count_by_status(db))
    public_paths = (
        set(PUBLIC_PATHS) | dashboard.PUBLIC_PATHS | (DOCS_PATHS if settings.public_docs else set())
    )
    state: dict[str, Any] = {
        "settings": settings,
        "db": db,
        "metrics": metrics,
        "authenticator": authenticator,
        "tokenizers": TokenizerCache(settings.tokenizer_cache_size, HubLoads.from_settings(settings)),
        "readiness_checks": {"database": _database_check(db)},
        "public_paths": public_paths,
        "shutdown_hooks": [],
    }
    for key, value in state.items():
        setattr(app.state, key, value)

    install_error_handlers(app)
    for module in (health, jobs, stream, datasets, webhooks, docs, dashboard):
        app.include_router(module.router)
    install_contract(app, public_paths)

    # Added last = outermost: request context wraps auth, auth wraps the body limit, which wraps the
    # GET-a-job fast path. With OpenTelemetry on, that GET goes through the router: FastAPI's spans
    # name their route there.
    if not settings.otel:
        app.add_middleware(JobReadFastPath, db=db, route=job_route())
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=settings.max_request_bytes,
        upload_limit=settings.max_upload_bytes,
        upload_paths=UPLOAD_PATHS,
    )
    app.add_middleware(AuthMiddleware, authenticator=authenticator, public_paths=public_paths)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app
