"""Fixtures for the workers tests: a store of its own per test, a local Ray cluster per module, a tiny spec."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.spec import JobSpec
from core.store import Database, upgrade
from tests.webhook_receiver import receiver  # noqa: F401 (fixture)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    """A migrated SQLite store of this test's own."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    database = Database(url)
    yield database
    database.dispose()


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """A 2-CPU local Ray cluster in this process, shut down after the module."""
    from tests import ray_helpers

    ray_helpers.start_local(num_cpus=2)
    try:
        yield None
    finally:
        ray_helpers.shutdown()


@pytest.fixture
def own_ray_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A Ray token of this test's own (its file), for a head it starts; later tests get the default one back."""
    from workers.ray_compat import reload_auth_token

    token = tmp_path / "ray-token"
    token.write_text(secrets.token_hex(32))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    reload_auth_token()
    yield token
    monkeypatch.undo()
    reload_auth_token()


@pytest.fixture
def job_spec(tiny_model_dir: Path, learnable_pairs_file: Path) -> Callable[..., JobSpec]:
    """A tiny 2-worker job on the learnable pairs; keyword overrides go into the `training` section."""

    def make(dataset: str | None = None, *, max_retries: int = 1, **training: Any) -> JobSpec:
        return JobSpec.model_validate(
            {
                "name": "ray-test",
                "model": str(tiny_model_dir),
                "dataset": {
                    "train": dataset or str(learnable_pairs_file),
                    "eval_fraction": 0.1,
                    "max_rows": 96,
                },
                "training": {
                    "max_steps": 8,
                    "batch_size": 8,
                    "max_length": 96,
                    "learning_rate": 1e-3,
                    "checkpoint_every": 3,
                    "eval_every": 4,
                    **training,
                },
                "resources": {"num_workers": 2, "cpus_per_worker": 1, "max_retries": max_retries},
            }
        )

    return make
