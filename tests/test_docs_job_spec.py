"""docs/job-spec.md against core/spec.py: every section of JobSpec has a row naming each of its fields."""

from __future__ import annotations

import typing

from pydantic import BaseModel

from core.spec import JobSpec
from tests.conftest import REPO

DOC = REPO / "docs" / "job-spec.md"


def spec_rows() -> dict[str, str]:
    """The spec table: section name -> its fields cell."""
    rows: dict[str, str] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 2:
            rows[cells[0].strip("`")] = cells[1]
    return rows


def models_in(annotation: object) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (`X | None`, `list[X]`...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in models_in(arg)]


def field_names(model: type[BaseModel]) -> set[str]:
    """A model's fields and, recursively, those of the models inside it."""
    names = set(model.model_fields)
    for field in model.model_fields.values():
        for inner in models_in(field.annotation):
            names |= field_names(inner)
    return names


def test_every_spec_field_is_documented() -> None:
    rows = spec_rows()
    missing_sections = sorted(set(JobSpec.model_fields) - set(rows))
    assert not missing_sections, f"docs/job-spec.md has no row for the sections {missing_sections}"
    stale = sorted(set(rows) - set(JobSpec.model_fields))
    assert not stale, f"docs/job-spec.md has rows for sections JobSpec does not have: {stale}"
    missing = [
        f"{section}.{name}"
        for section, field in JobSpec.model_fields.items()
        for model in models_in(field.annotation)
        for name in sorted(field_names(model))
        if f"`{name}`" not in rows[section]
    ]
    assert not missing, f"docs/job-spec.md does not name {missing}"
