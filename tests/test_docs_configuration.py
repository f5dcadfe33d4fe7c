"""docs/configuration.md against core/settings.py: every setting has a row, with the class's own default."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import AliasChoices, TypeAdapter
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from core.settings import Settings
from tests.conftest import REPO

DOC = REPO / "docs" / "configuration.md"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"
UNSET = "unset"


def env_names(name: str, field: FieldInfo) -> list[str]:
    """The environment variables a field is read from (its aliases, else the `MINORDPO_` name)."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    if isinstance(alias, str):
        return [alias]
    return [f"{Settings.model_config['env_prefix']}{name}".upper()]


def documented_rows() -> dict[str, tuple[str, str]]:
    """The settings table: variable -> (default cell, meaning cell)."""
    text = DOC.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, "docs/configuration.md lost its settings table markers"
    lines = [ln.strip() for ln in text.split(BEGIN, 1)[1].split(END, 1)[0].splitlines() if ln.strip()]
    rows: dict[str, tuple[str, str]] = {}
    for line in lines[2:]:  # header and separator
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 3, f"a settings row needs 3 cells: {line}"
        variable = cells[0].strip("`")
        assert variable not in rows, f"{variable} has two rows"
        rows[variable] = (cells[1], cells[2])
    return rows


def first_code(cell: str) -> str:
    """The first `backticked` value of a cell."""
    parts = cell.split("`")
    assert len(parts) >= 3, f"no `value` in the default cell {cell!r}"
    return parts[1]


def test_every_setting_has_a_row_and_every_row_is_a_setting() -> None:
    rows = documented_rows()
    fields = Settings.model_fields
    missing = [name for name, field in fields.items() if not set(env_names(name, field)) & set(rows)]
    assert not missing, f"docs/configuration.md has no row for {missing}"
    known = {env for name, field in fields.items() for env in env_names(name, field)}
    stale = sorted(set(rows) - known)
    assert not stale, f"docs/configuration.md documents settings that do not exist: {stale}"
    assert all(meaning for _, meaning in rows.values()), "a setting row says nothing about what it does"


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_the_documented_default_is_the_class_default(name: str) -> None:
    field = Settings.model_fields[name]
    rows = documented_rows()
    cell = next((rows[env][0] for env in env_names(name, field) if env in rows), None)
    assert cell is not None, f"docs/configuration.md has no row for {name}"
    if field.default_factory is not None:  # derived from other settings: described, not a literal
        assert cell.startswith("`"), f"{name}: describe the derived default in backticks"
        return
    default: Any = field.default
    assert default is not PydanticUndefined, f"{name} has no default"
    if default is None:
        assert cell == UNSET, f"{name}: the default is unset, the doc says {cell!r}"
        return
    documented = TypeAdapter(field.annotation).validate_python(first_code(cell))
    assert documented == default, f"{name}: the doc says {cell}, the class says {default!r}"
