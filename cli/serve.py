"""`minordpo serve`: run the HTTP API with uvicorn."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `serve` command to the main app."""

    @app.command()
    def serve() -> None:
        """Run the API server (not yet implemented in this increment)."""
        typer.echo("minordpo serve: the API lands with the job-service issue", err=True)
        raise typer.Exit(1)
