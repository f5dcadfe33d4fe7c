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


def load_settings(**overrides: Any) -> Any:
    """core.settings.Settings from the environment (and `overrides`); a bad value exits with one line per error."""
    from pydantic import ValidationError

    from core.settings import Settings

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = [_setting_error(Settings, error) for error in exc.errors()]
        # a default computed from another setting fails too when that one is bad: say only the cause
        raise fail("invalid setting: " + "; ".join(line for line in lines if line), code=2) from None


def _setting_error(settings_class: Any, error: Any) -> str:
    """`NAME: message` for one validation error ('' for a default that could not be computed)."""
    if error["type"] == "default_factory_not_called":
        return ""
    name = _setting_name(settings_class, error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ").removeprefix(f"{name}: ")
    return f"{name}: {message}"


def _setting_name(settings_class: Any, loc: tuple[Any, ...]) -> str:
    """The environment variable a validation error's location stands for (MINORDPO_<FIELD> or the field's alias)."""
    field = str(loc[0]) if loc else "?"
    info = settings_class.model_fields.get(field)
    alias = getattr(info, "validation_alias", None) if info is not None else None
    if isinstance(alias, str):
        return alias.upper()
    choices = getattr(alias, "choices", None)
    if choices:
        return str(choices[0]).upper()
    return f"MINORDPO_{field.upper()}" if info is not None else field
