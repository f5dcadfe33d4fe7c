"""`minordpo dispatcher`: run the dispatcher as its own process (the production layout)."""

from __future__ import annotations

import signal
import threading

import typer


def register(app: typer.Typer) -> None:
    """Add the `dispatcher` command to the main app."""

    @app.command()
    def dispatcher() -> None:
        """Claim queued jobs and run them on Ray until SIGINT/SIGTERM (needs an up-to-date schema)."""
        from api.logging import configure_logging
        from cli.output import load_settings
        from cli.serve import start_dispatcher
        from core.store import SchemaOutOfDateError, ensure_schema_current

        settings = load_settings()
        configure_logging(settings.log_level, json_lines=settings.log_json, log_format=settings.log_format)
        try:
            ensure_schema_current(settings.database_url, settings.auto_migrate)
        except SchemaOutOfDateError as exc:
            typer.echo(f"minordpo dispatcher: {exc}", err=True)
            raise typer.Exit(2) from exc
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        service = start_dispatcher(settings)
        try:
            done.wait()
        finally:
            service.stop()
