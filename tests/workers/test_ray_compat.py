"""The check of the installed Ray against the tested range, and what the service leaves off on an untested Ray (no Ray started)."""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from core.settings import Settings
from core.store import Database
from tests.conftest import REPO
from workers import ray_compat
from workers.ray_head import LocalHead


def _forget_the_check() -> None:
    ray_compat.supported.cache_clear()
    ray_compat.check_at_start_up.cache_clear()


@pytest.fixture
def untested_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process takes its Ray for 2.99.0 until the test ends."""
    monkeypatch.setenv(ray_compat.VERSION_ENV, "2.99.0")
    _forget_the_check()
    yield
    monkeypatch.undo()
    _forget_the_check()


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("2.60.0", True),
        ("2.60.7", True),
        ("2.61.0", False),
        ("2.59.2", False),
        ("3.0.0", False),
        ("3.0.0.dev0", False),
        ("2.60.0rc1", False),  # a pre-release comes before the tested release
        ("not a version", False),
    ],
)
def test_only_releases_of_the_tested_minor_are_supported(version: str, supported: bool) -> None:
    assert ray_compat.version_supported(version) is supported


def test_pyproject_pins_ray_to_the_tested_range_and_the_installed_ray_is_in_it() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    ray_pins = [dep for dep in project["dependencies"] if dep.startswith("ray[")]
    assert [pin.split("]", 1)[1].replace(" ", "") for pin in ray_pins] == [ray_compat.tested_range()]
    assert ray_compat.version_supported(ray.__version__)


def test_an_untested_ray_is_said_once_and_turns_private_conveniences_off(
    untested_ray: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="workers.ray_compat")
    assert ray_compat.check_at_start_up() is False
    assert ray_compat.check_at_start_up() is False
    said = [r.getMessage() for r in caplog.records if r.name == "workers.ray_compat"]
    assert len(said) == 1 and "Ray 2.99.0 is outside the tested range (>=2.60,<2.61)" in said[0]
    assert "warm pool is off" in said[0]
    # Ray Train's default callbacks are kept as they are
    callbacks = [object(), object()]
    assert ray_compat.without_datasets_callback(callbacks) is callbacks


def test_the_tested_ray_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    _forget_the_check()
    caplog.set_level(logging.WARNING, logger="workers.ray_compat")
    assert ray_compat.check_at_start_up() is True
    assert not [r for r in caplog.records if r.name == "workers.ray_compat"]


def test_the_service_keeps_no_warm_pool_on_an_untested_ray(untested_ray: None, tmp_path: Path) -> None:
    from workers.service import DispatcherService

    url = f"sqlite:///{tmp_path / 'store.db'}"
    settings = Settings(database_url=url, artifacts_dir=tmp_path / "artifacts", ray_warm_workers=2)
    service = DispatcherService(settings, Database(url))
    service.head = LocalHead("127.0.0.1:1", "http://127.0.0.1:2", 1, 2, node_manager_port=3)
    assert service._warm_pool_wanted() is False
    service.start_warm_pool()
    assert service.warm_pool is None and service._pool_thread is None
