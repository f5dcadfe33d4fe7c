"""A bad environment setting stops `serve` and `dispatcher` with one line naming the variable, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app


@pytest.mark.parametrize(
    ("command", "env", "expected"),
    [
        (["serve"], {"MINORDPO_PORT": "abc"}, "MINORDPO_PORT: Input should be a valid integer"),
        (
            ["dispatcher"],
            {"MINORDPO_PROJECT_QUOTAS": '{"team-a": {"max_job": 1}}'},
            "MINORDPO_PROJECT_QUOTAS: team-a.max_job is not a quota",
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(
    tmp_path: Path, command: list[str], env: dict[str, str], expected: str
) -> None:
    env = {"MINORDPO_ARTIFACTS_DIR": str(tmp_path / "artifacts"), **env}
    result = CliRunner().invoke(app, command, env=env)
    assert result.exit_code == 2
    assert expected in result.output
    assert "Traceback" not in result.output and "validation error" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "artifacts").exists()  # nothing started
