"""`minordpo db ...`: schema migrations."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)

UrlOption = typer.Option(
    None, "--url", help="Database URL (default: MINORDPO_DATABASE_URL or the settings default)"
)


def _url(url: str | None) -> str:
    from sqlalchemy.exc import ArgumentError

    from core.store.db import normalize_url

    if not url:
        from core.settings import get_settings

        url = get_settings().database_url
    try:
        normalize_url(url)
    except ArgumentError:
        typer.echo(f"invalid database URL {url!r} (set MINORDPO_DATABASE_URL or pass --url)", err=True)
        raise typer.Exit(2) from None
    return url


def _shown(url: str) -> str:
    from core.store.db import normalize_url

    return normalize_url(url).render_as_string(hide_password=True)


@app.command()
def upgrade(
    revision: str = typer.Argument("head", help="Target revision"),
    url: str | None = UrlOption,
) -> None:
    """Apply migrations up to REVISION (default: the newest) and print the revision reached."""
    from core.store import migrate

    target = _url(url)
    before = migrate.current_revision(target)
    reached = migrate.upgrade(target, revision)
    if before == reached:
        typer.echo(f"{_shown(target)}: already at {reached}")
    else:
        typer.echo(f"{_shown(target)}: upgraded {before or 'empty database'} -> {reached}")


@app.command()
def downgrade(
    revision: str = typer.Argument(..., help="Target revision (`base` drops every table)"),
    url: str | None = UrlOption,
) -> None:
    """Revert migrations down to REVISION and print the revision reached."""
    from core.store import migrate

    target = _url(url)
    reached = migrate.downgrade(target, revision)
    typer.echo(f"{_shown(target)}: downgraded to {reached or 'base (empty)'}")


@app.command()
def current(url: str | None = UrlOption) -> None:
    """Print the database's revision and the code's head; exit 1 when they differ."""
    from core.store import migrate

    target = _url(url)
    status = migrate.schema_status(target)
    state = "up to date" if status.up_to_date else "out of date: run `minordpo db upgrade`"
    typer.echo(f"{_shown(target)}: at {status.current or 'empty (no tables)'}, head {status.head} ({state})")
    if not status.up_to_date:
        raise typer.Exit(1)
