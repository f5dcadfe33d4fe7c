"""Entry point of the `minordpo` console script: one Typer app, each command group in its own module."""

from __future__ import annotations

import typer

from cli import db, dispatcher, jobs, serve, sweep, train, watch

app = typer.Typer(
    name="minordpo",
    help="MinorDPO Service: preference-optimization training (MinorDPO and the DPO family).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(db.app, name="db", help="Database schema (Alembic migrations).")
serve.register(app)
dispatcher.register(app)
train.register(app)
jobs.register(app)
watch.register(app)
sweep.register(app)

if __name__ == "__main__":
    app()
