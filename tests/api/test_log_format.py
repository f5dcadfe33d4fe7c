"""Log lines by audience: JSON for collectors (not a TTY, or LOG_FORMAT=json), readable text on a terminal."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from api.logging import configure_logging, register_secret
from core.settings import Settings


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def emit(stream: io.StringIO, **config: object) -> str:
    configure_logging("INFO", stream=stream, **config)  # type: ignore[arg-type]
    register_secret("tok-never-logged-1234")
    logging.getLogger("api.test").info(
        "job started with tok-never-logged-1234", extra={"job_id": "job_1", "status": 201}
    )
    return stream.getvalue()


@pytest.fixture(autouse=True)
def restore_logging() -> object:
    yield
    configure_logging("INFO", log_format="json")


def test_auto_writes_json_lines_when_not_a_terminal() -> None:
    line = json.loads(emit(io.StringIO(), log_format="auto").strip().splitlines()[-1])
    assert line["logger"] == "api.test" and line["level"] == "INFO"
    assert line["job_id"] == "job_1" and line["status"] == 201
    assert "tok-never-logged" not in line["msg"]


def test_auto_writes_readable_lines_on_a_terminal() -> None:
    raw = emit(Terminal(), log_format="auto")
    assert not raw.lstrip().startswith("{")
    out = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", raw).split())  # colours off; Rich wraps at the width
    assert "INFO" in out and "api.test: job started with ***" in out
    assert "job_id=job_1" in out and "status=201" in out
    assert "tok-never-logged" not in out


def test_the_setting_overrides_the_terminal_either_way() -> None:
    assert json.loads(emit(Terminal(), log_format="json").strip().splitlines()[-1])["job_id"] == "job_1"
    assert "api.test: job started" in emit(io.StringIO(), log_format="text")
    # the older switch still forces JSON or text under auto
    assert emit(Terminal(), log_format="auto", json_lines=True).lstrip().startswith("{")


def test_settings_read_the_format_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINORDPO_LOG_FORMAT", "text")
    assert Settings().log_format == "text"
    monkeypatch.setenv("MINORDPO_LOG_FORMAT", "yaml")
    with pytest.raises(ValueError, match="log_format"):
        Settings()
