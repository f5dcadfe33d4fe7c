"""Path policy for specs: local paths resolve inside the allowed roots and outside the service's own files."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from api.errors import ProblemError

# `name` or `org/name`: letters, digits, `-`, `_`, `.`; at most one slash; no `..`; no leading `.`.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")


@dataclass(frozen=True)
class ResolvedPath:
    """A spec value after the policy: a real local path inside a root, or a hub id passed through."""

    value: str
    is_hub_id: bool = False


def looks_like_hub_id(value: str) -> bool:
    """True for `org/name`-shaped values; anything with `..`, a leading `/` or `.` or `~` is a path."""
    if not value or ".." in value or value[0] in "/.~\\" or "\\" in value:
        return False
    if value.lower().endswith((".json", ".jsonl", ".gz", ".parquet", ".safetensors", ".bin")):
        return False
    return bool(_HUB_ID.match(value))


@dataclass(frozen=True)
class PathPolicy:
    """Where spec paths may point: inside one of `roots`, and never inside one of `owned` (the service's files)."""

    roots: list[Path]
    owned: list[Path] = dataclasses.field(default_factory=list)


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _refuse(field: str, value: str, msg: str) -> ProblemError:
    shown = value if len(value) <= 300 else value[:300] + "..."
    text = f"path '{shown}' {msg}"
    return ProblemError(422, f"{field}: {text}", errors=[{"loc": field, "msg": text}])


def _real(value: str, field: str, base: Path) -> Path:
    """`value` made absolute against `base`, every symlink followed (the path need not exist)."""
    if "\x00" in value:
        raise _refuse(field, value.replace("\x00", "\\0"), "contains a NUL byte")
    candidate = Path(value)
    if not candidate.is_absolute():
        candidate = base / candidate
    try:
        return Path(os.path.realpath(candidate, strict=False))
    except (OSError, ValueError, RuntimeError) as exc:  # symlink loops, over-long names
        raise _refuse(field, value, f"cannot be resolved ({exc.__class__.__name__})") from exc


def _check_place(real: Path, field: str, value: str, policy: PathPolicy) -> None:
    """Refuse a resolved path outside the roots or inside the service's own files (decided on the name alone)."""
    if _inside(real, policy.owned):
        raise _refuse(
            field,
            value,
            "is not allowed: it lies among this service's own files (name an uploaded dataset by its "
            "ds_ id and a trained model by its job id)",
        )
    if not _inside(real, policy.roots):
        shown = ", ".join(str(r) for r in policy.roots)
        raise _refuse(
            field, value, f"resolves outside the allowed roots ({shown}); set MINORDPO_ALLOWED_PATHS"
        )


def _exists(path: Path, field: str, value: str, *, lexists: bool = False) -> bool:
    try:
        return os.path.lexists(path) if lexists else path.exists()
    except OSError as exc:  # ENAMETOOLONG, ELOOP, EACCES on a parent
        raise _refuse(field, value, f"cannot be checked ({exc.strerror or exc.__class__.__name__})") from exc


def resolve_local(
    value: str, field: str, policy: PathPolicy, *, must_exist: bool = True, base: Path | None = None
) -> Path:
    """Resolve `value` (following every symlink); it must lie inside a root and outside the service's files.

    Where the path lies is checked before whether it exists, so an answer never tells whether a path
    outside the roots (or among the service's files) exists.
    """
    real = _real(value, field, base or Path.cwd())
    _check_place(real, field, value, policy)
    if must_exist and not _exists(real, field, value):
        raise _refuse(field, value, "does not exist")
    return real


def resolve_model(value: str, field: str, policy: PathPolicy, *, base: Path | None = None) -> ResolvedPath:
    """A model is a local folder inside the roots, or a hub id when it looks like one and no such local path exists."""
    base = base or Path.cwd()
    if looks_like_hub_id(value):
        _check_place_if_local(value, field, policy, base)
        if not _exists(base / value, field, value, lexists=True):
            return ResolvedPath(value, is_hub_id=True)
    real = resolve_local(value, field, policy, base=base)
    if not real.is_dir():  # exists (checked above), so is_dir cannot fail on the name
        raise _refuse(field, value, "is not a folder (a Hugging Face model folder is expected)")
    return ResolvedPath(str(real))


def _check_place_if_local(value: str, field: str, policy: PathPolicy, base: Path) -> None:
    """A hub-shaped value that names the service's own files is refused whether or not it exists there."""
    real = _real(value, field, base)
    if _inside(real, policy.owned):
        _check_place(real, field, value, policy)


def resolve_dataset_file(
    value: str, field: str, policy: PathPolicy, *, base: Path | None = None
) -> ResolvedPath:
    """A dataset file or load_from_disk folder must resolve inside the roots; `hf:` values are hub references.

    A `hf:` value is never read as a local path: it is passed through (is_hub_id) for the hub loader.
    """
    if value.startswith("hf:"):
        return ResolvedPath(value, is_hub_id=True)
    return ResolvedPath(str(resolve_local(value, field, policy, base=base)))
