"""Run the real job driver (`workers.entrypoint.run`) in-process with the Ray run replaced by a test double."""

from __future__ import annotations

from typing import Any

import pytest

from core.settings import get_settings
from workers import entrypoint, job_run, ray_connect


def run_real_driver(monkeypatch: pytest.MonkeyPatch, job_id: str, run_job: Any, **env: str) -> None:
    """Drive `job_id` to its end with `run_job` in place of the Ray run; `env` sets MINORDPO_* variables."""
    for name, value in env.items():
        monkeypatch.setenv(f"MINORDPO_{name.upper()}", value)
    monkeypatch.setattr(job_run, "run_job", run_job)
    monkeypatch.setattr(ray_connect, "connect", lambda address: None)
    get_settings.cache_clear()
    try:
        assert entrypoint.run(job_id) == 0
    finally:
        get_settings.cache_clear()
