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
        api_workers: Annotated[
            int | None,
            typer.Option(
                "--api-workers",
                min=1,
                max=64,
                help="API processes on the one socket (default MINORDPO_API_WORKERS, 1); the dispatcher stays one",
            ),
        ] = None,
    ) -> None:
        """Run the API server (schema check first; a fresh SQLite database is created and migrated)."""
        from api.logging import configure_logging
        from cli.output import load_settings

        overrides: dict[str, Any] = {}
        if host is not None:
            overrides["host"] = host
        if port is not None:
            overrides["port"] = port
        if api_workers is not None:
            overrides["api_workers"] = api_workers
        settings = load_settings(**overrides)
        configure_logging(settings.log_level, json_lines=settings.log_json, log_format=settings.log_format)
        _clear_shared_metrics()
        application = build_app(settings)  # every start-up check, made once here
        if settings.api_workers > 1:
            _serve_from_workers(settings, application)
            return
        if settings.embedded_dispatcher:
            # stopped by the app's shutdown, not after uvicorn.run: uvicorn re-raises SIGTERM when it returns
            service = start_dispatcher(settings, application)
            application.state.shutdown_hooks.append(service.stop)
        log.info("serving on http://%s:%d", settings.host, settings.port)
        gc.collect()
        gc.freeze()  # start-up objects leave the collector's view: full collections stay short under load
        _run_uvicorn(application, settings)


def _clear_shared_metrics() -> None:
    """With PROMETHEUS_MULTIPROC_DIR set (by the operator), the processes count in its files: an earlier
    run's must go, whether one process serves or several."""
    from pathlib import Path

    from api.metrics import multiprocess_dir
    from cli.api_processes import clear_metric_files

    folder = multiprocess_dir()
    if folder:
        clear_metric_files(Path(folder))


def _serve_from_workers(settings: Settings, checked_app: Any) -> None:
    """The parent of several API workers: the port bound first, then the dispatcher (if embedded) here."""
    from cli.api_processes import ApiWorkers

    checked_app.state.db.dispose()  # the workers build their own apps
    try:
        workers = ApiWorkers(settings)
    except SystemExit as exc:  # uvicorn logged why (e.g. the port is taken)
        typer.echo(f"minordpo serve: cannot listen on {settings.host}:{settings.port}", err=True)
        raise typer.Exit(2) from exc
    try:
        service = start_dispatcher(settings) if settings.embedded_dispatcher else None
    except BaseException:
        workers.close()
        raise
    ray_jobs_url = service.ray_jobs.address if service is not None and service.ray_jobs is not None else None
    log.info(
        "serving on http://%s:%d from %d API workers", settings.host, settings.port, settings.api_workers
    )
    try:
        code = workers.run(ray_jobs_url=ray_jobs_url)
    finally:
        if service is not None:
            service.stop()
    if code:
        raise typer.Exit(code)


def start_dispatcher(settings: Settings, application: Any = None) -> Any:
    """Connect to Ray and start the dispatcher thread; Ray's reachability joins the readiness checks."""
    from core.store import Database
    from workers.ray_jobs_client import RayUnavailableError
    from workers.service import DispatcherService

    service = DispatcherService(settings, Database(settings.database_url))
    try:
        service.connect()
    except RayUnavailableError as exc:
        typer.echo(f"minordpo: no Ray to run jobs on: {exc}", err=True)
        raise typer.Exit(2) from exc
    if application is not None:
        application.state.readiness_checks["ray"] = service.ready
    service.start()
    return service


def _run_uvicorn(application: Any, settings: Settings) -> None:
    import uvicorn

    from cli.api_processes import SERVER_OPTIONS

    uvicorn.run(application, host=settings.host, port=settings.port, **SERVER_OPTIONS)
