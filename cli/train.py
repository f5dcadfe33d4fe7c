"""`minordpo train` and `minordpo make-tiny-model`: the core engine from the command line."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the core-engine commands to the main app."""
