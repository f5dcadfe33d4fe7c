"""`minordpo serve`: check the schema, build the app and run it with uvicorn on Settings.host/port."""

from __future__ import annotations

import gc
import logging
from typing import Annotated, Any

import typer

from core.settings import Settings

log = logging.getLogger("minordpo.serve")


def prepare_database(settings: Settings) -> str:
    """Make the schema current or explain why not; a fresh embedded SQLite file is created and migrated.

    Returns the head revision; raises core.store.SchemaOutOfDateError (its message names
    `minordpo db upgrade`) when the database is behind and MINORDPO_AUTO_MIGRATE is off.
    """
    from core.store import ensure_schema_current, sqlite_file, upgrade

    path = sqlite_file(settings.database_url)
    if path is not None and not path.expanduser().exists():
        path.expanduser().parent.mkdir(parents=True, exist_ok=True)
        log.info("creating the SQLite database %s", path)
        upgrade(settings.database_url)
    return ensure_schema_current(settings.database_url, settings.auto_migrate)


def build_app(settings: Settings) -> Any:
    """Schema check, artifacts folder, then the app (errors are reported and exit non-zero)."""
    from api.main import create_app
    from api.services.auth import StartupError, check_open_bind, load_token_entries
    from core.store import SchemaOutOfDateError

    try:  # refuse an open server off loopback before touching the database
        check_open_bind(settings, load_token_entries(settings))
    except StartupError as exc:
        typer.echo(f"minordpo serve: {exc}", err=True)
        raise typer.Exit(2) from exc
    try:
        revision = prepare_database(settings)
    except SchemaOutOfDateError as exc:
        typer.echo(f"minordpo serve: {exc}", err=True)
        raise typer.Exit(2) from exc
    log.info("database schema at %s", revision)
    settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
    try:
        return create_app(settings)
    except StartupError as exc:
        typer.echo(f"minordpo serve: {exc}", err=True)
        raise typer.Exit(2) from exc


def register(app: typer.Typer) -> None:
    """Add the `serve` command to the main app."""

    @app.command()
    def serve(
        host: Annotated[
            str | None, typer.Option(help="Bind address (default MINORDPO_HOST, 127.0.0.1)")
        ] = None,
        port: Annotated[int | None, typer.Option(help="Port (default MINORDPO_PORT, 8000)")] = None,
    ) -> None:
        """Run the API server (schema check first; a fresh SQLite database is created and migrated)."""
        import uvicorn

        from api.logging import configure_logging

        overrides: dict[str, Any] = {}
        if host is not None:
            overrides["host"] = host
        if port is not None:
            overrides["port"] = port
        settings = Settings(**overrides)
        configure_logging(settings.log_level, json_lines=settings.log_json)
        application = build_app(settings)
        if settings.embedded_dispatcher:
            # stopped by the app's shutdown, not after uvicorn.run: uvicorn re-raises SIGTERM when it returns
            service = start_dispatcher(settings, application)
            application.state.shutdown_hooks.append(service.stop)
        log.info("serving on http://%s:%d", settings.host, settings.port)
        gc.collect()
        gc.freeze()  # start-up objects leave the collector's view: full collections stay short under load
        _run_uvicorn(uvicorn, application, settings)


def start_dispatcher(settings: Settings, application: Any = None) -> Any:
    """Connect to Ray and start the dispatcher thread; Ray's reachability joins the readiness checks."""
    from core.store import Database
    from workers.ray_control import RayUnavailableError
    from workers.service import DispatcherService

    service = DispatcherService(settings, Database(settings.database_url))
    try:
        service.connect()
    except RayUnavailableError as exc:
        typer.echo(f"minordpo: cannot start Ray: {exc}", err=True)
        raise typer.Exit(2) from exc
    if application is not None:
        application.state.readiness_checks["ray"] = service.ready
    service.start()
    return service


def _run_uvicorn(uvicorn: Any, application: Any, settings: Settings) -> None:
    uvicorn.run(
        application,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
