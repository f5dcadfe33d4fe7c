"""Read a job spec from a JSON or YAML file, with `key.path=value` overrides."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from core.spec import JobSpec, error_lines


class SpecFileError(ValueError):
    """The spec file cannot be read or is invalid; the message lists every offending field."""


FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class _SpecLoader(yaml.SafeLoader):
    """YAML 1.1's safe loader, reading `5e-6` as a number (YAML 1.1 wants `5.0e-6`; YAML 1.2 and JSON do not)."""


_SpecLoader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT, list("-+0123456789."))


def parse_value(raw: str) -> Any:
    """A YAML scalar (`true`, `[a, b]`, `0.5`), with `1e-5` read as a number (YAML 1.1 would keep a string)."""
    if FLOAT.match(raw.strip()):
        return float(raw)
    try:
        return yaml.load(raw, Loader=_SpecLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError:
        return raw


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in nested mappings, creating missing sections."""
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecFileError(f"{key!r}: {part!r} is not a section")
        node = child
    node[leaf] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries (values parsed as YAML scalars: 1e-5, true, [a, b])."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecFileError(f"override {item!r} is not KEY=VALUE")
        set_path(data, key, parse_value(raw))
    return data


def read_spec_dict(path: Path) -> dict[str, Any]:
    """The raw mapping in a JSON or YAML spec file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecFileError(f"cannot read spec {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise SpecFileError(f"{path} is not UTF-8 text (byte {exc.start})") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_SpecLoader)  # noqa: S506
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecFileError(
            f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise SpecFileError(f"{path} must hold a mapping (the job spec), not {type(data).__name__}")
    return data


def load_spec(path: Path, overrides: list[str] | None = None) -> JobSpec:
    """A validated JobSpec from a file; errors name each field (``loss.beta: ...``)."""
    data = apply_overrides(read_spec_dict(path), overrides or [])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecFileError(f"invalid spec {path}:\n  " + "\n  ".join(error_lines(exc))) from exc
