"""Failures a retry cannot fix (unreadable data, a NaN loss) end a job on its first try as one JobFailure:
the worker loop in-process, no Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.train
import ray.train.torch as ray_train_torch

from core import losses
from core.data.limits import DataLimits
from core.failures import JobFailure
from core.spec import JobSpec
from workers import train_worker
from workers.launch_record import LaunchRecord
from workers.train_worker import train_loop_per_worker


class _Remote:
    def __init__(self, fn: Any) -> None:
        self.remote = fn


class FakeChannel:
    """The job channel's three methods the worker calls, kept in memory (`ray.get` is patched to pass values)."""

    def __init__(self) -> None:
        self.fatal: JobFailure | None = None
        self.items: list[dict[str, Any]] = []
        self.get_fatal = _Remote(lambda: self.fatal)
        self.set_fatal = _Remote(self._set_fatal)
        self.put = _Remote(self.items.append)

    def _set_fatal(self, failure: JobFailure) -> None:
        self.fatal = failure


class OneRank:
    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1

    def get_local_rank(self) -> int:
        return 0


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
    config = {"launch": LaunchRecord("deep", spec, tmp_path), "channel": channel}

    with pytest.raises(JobFailure) as first:
        train_loop_per_worker(config)
    assert first.value.code == "dataset_error"
    assert "line 1" in first.value.message and "nested deeper than 100 levels" in first.value.message
    assert channel.fatal == first.value

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the loop ran again after a fatal data error")

    monkeypatch.setattr(train_worker, "Trainer", must_not_run)
    retried = train_loop_per_worker(config)  # what Ray's restart of the worker group would do
    assert retried.status == "failed" and retried.failure == first.value


def test_the_operators_data_limits_reach_the_loop_in_the_record_not_parsed_again(
    without_ray: None, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
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
    launch = LaunchRecord("limits", spec, tmp_path, data_limits=DataLimits(max_json_depth=4))
    config = {"launch": launch, "channel": FakeChannel()}

    def parsed_again(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the worker validated the spec again")

    monkeypatch.setattr(JobSpec, "model_validate", parsed_again)
    monkeypatch.setattr(JobSpec, "model_validate_json", parsed_again)
    with pytest.raises(JobFailure) as failed:
        train_loop_per_worker(config)
    assert failed.value.code == "dataset_error" and "nested deeper than 4 levels" in failed.value.message


def test_a_nan_loss_is_recorded_as_a_plain_job_failure_with_its_step(
    without_ray: None,
    tiny_model_dir: Path,
    learnable_pairs_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = losses.LOSSES["sigmoid"]
    monkeypatch.setitem(losses.LOSSES, "sigmoid", lambda *a, **kw: real(*a, **kw) * float("nan"))
    monkeypatch.setattr(ray, "wait", lambda refs, timeout: (refs, []))  # rank 0's cancel poll
    monkeypatch.setattr(ray_train_torch, "prepare_model", lambda model: model)  # one rank: no DDP
    spec = JobSpec.model_validate(
        {
            "name": "nan",
            "model": str(tiny_model_dir),
            "loss": {"type": "sigmoid"},
            "dataset": {"train": str(learnable_pairs_file), "max_rows": 16},
            "training": {"max_steps": 2, "batch_size": 4, "max_length": 64},
        }
    )
    channel = FakeChannel()
    channel.cancel_requested = _Remote(lambda: False)
    config = {"launch": LaunchRecord("nan", spec, tmp_path), "channel": channel}

    with pytest.raises(JobFailure) as failed:
        train_loop_per_worker(config)
    assert (failed.value.code, failed.value.message) == ("non_finite_loss", "loss is nan at step 1")
    # the channel's process unpickles what is recorded: the base class, not the loop's TrainingError
    assert type(channel.fatal) is JobFailure and channel.fatal == failed.value
