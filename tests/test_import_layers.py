"""The import contracts in pyproject.toml hold, and they would catch `core` importing the API or a cycle in workers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("cli", "api", "workers", "minordpo_client", "core")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter on the packages under `root`, importing them from there."""
    executable = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(executable), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def copy_of_the_packages(dest: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_contracts_hold() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_core_importing_the_api_breaks_the_layers(tmp_path: Path) -> None:
    root = copy_of_the_packages(tmp_path)
    losses = root / "core" / "losses.py"
    losses.write_text(losses.read_text(encoding="utf-8") + "\nimport api.errors  # noqa\n", encoding="utf-8")
    result = lint_imports(root)
    assert result.returncode != 0
    assert "core.losses -> api.errors" in result.stdout, result.stdout


def test_a_cycle_inside_workers_is_caught(tmp_path: Path) -> None:
    root = copy_of_the_packages(tmp_path)
    conventions = root / "workers" / "conventions.py"
    text = conventions.read_text(encoding="utf-8") + "\nfrom workers import job_run  # noqa\n"
    conventions.write_text(text, encoding="utf-8")
    result = lint_imports(root)
    assert result.returncode != 0
    assert "no import cycles" in result.stdout and "BROKEN" in result.stdout, result.stdout
