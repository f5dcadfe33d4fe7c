"""Logging: JSON lines for collectors, readable lines on a terminal; a request id per request, secrets redacted."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Fields a record may carry through `extra=` that become top-level keys of the JSON line.
EXTRA_FIELDS = ("method", "path", "status", "duration_ms", "job_id", "project", "client")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
_secrets: set[str] = set()


def register_secret(value: str) -> None:
    """Never let `value` (an API token) reach a log line, whatever logger writes it."""
    if len(value) >= 4:
        _secrets.add(value)


def redact(text: str) -> str:
    """Replace bearer credentials and registered secrets in `text` with `***`."""
    text = _BEARER.sub(r"\1***", text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: ts, level, logger, msg, request_id and request fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        for key in EXTRA_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                payload[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            payload["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(payload, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Plain text for people at a terminal, redacted like the JSON form, with the record's key fields."""

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None) or request_id_var.get()
        fields = [
            f"{key}={getattr(record, key)}" for key in EXTRA_FIELDS if getattr(record, key, None) is not None
        ]
        base = " ".join([super().format(record), *fields])
        return redact(f"{base} [{rid}]" if rid else base)


def _terminal_handler(stream: Any) -> logging.Handler:
    """Rich's handler for a person at a terminal: aligned time and coloured level, then logger and message."""
    from rich.console import Console
    from rich.highlighter import NullHighlighter
    from rich.logging import RichHandler

    console = Console(file=stream, stderr=stream is None)
    handler = RichHandler(
        console=console, show_path=False, markup=False, rich_tracebacks=False, highlighter=NullHighlighter()
    )
    handler.setFormatter(TextFormatter("%(name)s: %(message)s"))
    return handler


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is at emit time (test runners swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def wants_json(log_format: str, stream: Any = None) -> bool:
    """`json` and `text` are what they say; `auto` is JSON unless the stream (stderr) is a terminal."""
    if log_format != "auto":
        return log_format == "json"
    target = stream if stream is not None else sys.stderr
    isatty = getattr(target, "isatty", None)
    return not (callable(isatty) and isatty())


def configure_logging(
    level: str = "INFO", *, json_lines: bool | None = None, stream: Any = None, log_format: str = "auto"
) -> None:
    """Route the root, uvicorn and app loggers to one handler on stderr (idempotent).

    The form: `log_format` json or text as given; with `auto`, `json_lines` when set (the older
    MINORDPO_LOG_JSON), else JSON unless stderr is a terminal (`wants_json`). Text is Rich's readable
    lines: time, level, logger, message and the record's key fields.
    """
    if log_format == "auto" and json_lines is not None:
        as_json = json_lines
    else:
        as_json = wants_json(log_format, stream)
    if as_json:
        handler: logging.Handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
        handler.setFormatter(JsonFormatter())
    else:
        handler = _terminal_handler(stream)
    handler._minordpo = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_minordpo", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        log = logging.getLogger(name)
        log.handlers.clear()
        log.propagate = True
    # Our middleware writes the access line; uvicorn's own would duplicate it. Alembic's plugin
    # set-up chatter is not news either.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    for chatty in ("httpx", "httpcore"):  # they log full request URLs (webhook URLs can hold credentials)
        logging.getLogger(chatty).setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
