"""Console output shared by the commands: stdout for results, stderr for progress and one-line errors."""

from __future__ import annotations

import math
import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

# Piped output (scripts, CI logs) gets wide lines instead of Rich's 80-column default, so ids stay whole.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def number(value: Any) -> str:
    """A metric for a table cell: 4 significant digits, `-` for missing or non-finite values."""
    if isinstance(value, int | float) and math.isfinite(value):
        return f"{value:.4g}"
    return "-"


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` to stderr (never wrapped, so paths and line numbers stay whole); return the Exit to raise."""
    err.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)
