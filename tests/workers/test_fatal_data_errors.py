"""A job whose data cannot be read fails as dataset_error on its first try: the worker loop in-process, no Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.train

from core.spec import JobSpec
from workers import train_worker
from workers.conventions import JobPolicy
from workers.train_worker import FatalJobError, train_loop_per_worker


class _Remote:
    def __init__(self, fn: Any) -> None:
        self.remote = fn


class FakeChannel:
    """The job channel's three methods the worker calls, kept in memory (`ray.get` is patched to pass values)."""

    def __init__(self) -> None:
        self.fatal: dict[str, Any] | None = None
        self.items: list[dict[str, Any]] = []
        self.get_fatal = _Remote(lambda: self.fatal)
        self.set_fatal = _Remote(self._set_fatal)
        self.put = _Remote(self.items.append)

    def _set_fatal(self, payload: dict[str, Any]) -> None:
        self.fatal = payload


class OneRank:
    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1


@pytest.fixture
def without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray.train, "get_context", OneRank)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray, "get", lambda value, timeout=None: value)


def test_deeply_nested_data_is_a_dataset_error_recorded_so_a_retry_does_not_run_again(
    without_ray: None, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "deep.jsonl"
    data.write_text("[" * 100_000 + "\n", encoding="utf-8")
    spec = JobSpec.model_validate(
        {
            "name": "deep",
            "model": str(tiny_model_dir),
            "dataset": {"train": str(data)},
            "training": {"max_steps": 1},
        }
    )
    channel = FakeChannel()
    config = {"spec": spec.model_dump_json(), "output_dir": str(tmp_path / "out"), "channel": channel}

    with pytest.raises(FatalJobError) as first:
        train_loop_per_worker(config)
    assert first.value.code == "dataset_error"
    assert "line 1" in first.value.message and "nested deeper than 100 levels" in first.value.message
    assert channel.fatal is not None and channel.fatal["code"] == "dataset_error"

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the loop ran again after a fatal data error")

    monkeypatch.setattr(train_worker, "Trainer", must_not_run)
    retried = train_loop_per_worker(config)  # what Ray's restart of the worker group would do
    assert retried["status"] == "failed" and retried["error"]["code"] == "dataset_error"


def test_the_operators_data_limits_reach_the_loop(
    without_ray: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "nested.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": [[[[[[["r"]]]]]]]}) + "\n")
    spec = JobSpec.model_validate(
        {
            "name": "limits",
            "model": str(tiny_model_dir),
            "dataset": {"train": str(data)},
            "training": {"max_steps": 1},
        }
    )
    config = {
        "spec": spec.model_dump_json(),
        "output_dir": str(tmp_path / "out"),
        "channel": FakeChannel(),
        "policy": JobPolicy(data_limits={"max_json_depth": 4}),
    }
    with pytest.raises(FatalJobError) as failed:
        train_loop_per_worker(config)
    assert failed.value.code == "dataset_error" and "nested deeper than 4 levels" in failed.value.message
