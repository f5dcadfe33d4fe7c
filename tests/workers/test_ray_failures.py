"""Ray's exceptions as JobFailures (workers.ray_failures), the run's typed outcome, and rank 0's cancel poll.

No Ray cluster: the exceptions are built as Ray builds them, so a Ray upgrade that changes them fails here.
"""

from __future__ import annotations

import pickle
import time
from typing import Any

import pytest
import ray
from ray import exceptions as ray_errors
from ray.train import ControllerError, WorkerGroupError

from core.data import DatasetError
from core.failures import JobFailure
from core.training import TrainingError
from workers import train_worker
from workers.ray_failures import failure_from_ray
from workers.run_outcome import RunOutcome
from workers.train_worker import CancelWatch, loop_failure


def _task_error(cause: BaseException) -> ray_errors.RayTaskError:
    """What a task or actor method that raised `cause` gives its caller."""
    return ray_errors.RayTaskError(
        "fn", "Traceback (most recent call last):\n  ...", cause, "p", 1, "127.0.0.1"
    )


def _worker_died() -> BaseException:
    """What Ray Train reports for a Train worker whose process died (its health check found it gone)."""
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    return WorkerHealthCheckFailedError("worker health check failed", ray_errors.ActorDiedError())


def _user_error(exc: BaseException) -> BaseException:
    """What Ray Train reports for a Train worker whose loop raised `exc`."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    return UserExceptionWithTraceback(exc, f"Traceback (most recent call last):\n  ...\n{exc!r}")


def test_a_failure_raised_in_a_worker_comes_back_as_itself_from_any_rank() -> None:
    nan = JobFailure("non_finite_loss", "loss is nan at step 3")
    group = WorkerGroupError("rank 1 failed", {0: _worker_died(), 1: _user_error(nan)})
    assert failure_from_ray(group, retries=1) == nan
    assert failure_from_ray(_task_error(nan)) == nan


@pytest.mark.parametrize(
    ("error", "code", "words"),
    [
        (_worker_died(), "worker_lost", "worker rank 1 was lost (2 retries used up)"),
        (_user_error(ValueError("bad thing")), "worker_error", "worker rank 1 failed (2 retries used up): ValueError"),
        (ray_errors.OutOfMemoryError("Task was killed due to the node running low on memory."), "out_of_memory",
         "worker rank 1 ran out of memory"),
        (_task_error(type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory")), "out_of_memory",
         "ran out of memory"),
        (ray_errors.NodeDiedError("node 10.0.0.2 died"), "node_lost", "worker rank 1 lost its node"),
    ],
)  # fmt: skip
def test_ray_errors_of_a_worker_get_a_code_of_their_own(error: BaseException, code: str, words: str) -> None:
    failure = failure_from_ray(WorkerGroupError("failed", {1: error, 3: ValueError("later rank")}), retries=2)
    assert failure.code == code and words in failure.message, failure
    assert "Traceback" not in failure.message and len(failure.message) <= 500
    assert pickle.loads(pickle.dumps(failure)) == failure


def test_a_killed_rank_explains_its_peers_collective_errors() -> None:
    """Rank 1's process is killed; rank 0's next gloo collective fails too. The job lost a worker, whichever
    rank's error Ray collected first; a rank that raised its own error explains its peers' failed collectives."""
    peer = _user_error(
        RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1")
    )
    both = failure_from_ray(WorkerGroupError("failed", {0: peer, 1: _worker_died()}))
    assert both.code == "worker_lost" and both.message.startswith("worker rank 1 was lost"), both
    alone = failure_from_ray(WorkerGroupError("failed", {0: peer}))
    assert alone.code == "worker_lost" and "another rank was lost" in alone.message, alone
    crashed = failure_from_ray(WorkerGroupError("failed", {0: peer, 2: _user_error(ValueError("bad"))}))
    assert crashed.code == "worker_error" and crashed.message.startswith("worker rank 2 failed"), crashed


def test_a_lost_fit_task_and_a_controller_error_are_mapped_too() -> None:
    lost = failure_from_ray(ray_errors.WorkerCrashedError())
    assert lost.code == "worker_lost" and lost.retryable and lost.message.startswith("the run was lost")
    controller = failure_from_ray(ControllerError(RuntimeError("placement group removed")))
    assert controller.code == "worker_error" and "the Train controller failed" in controller.message


def test_loop_errors_a_retry_cannot_fix_become_plain_job_failures() -> None:
    nan = loop_failure(TrainingError("non_finite_loss", "loss is nan at step 3"))
    assert type(nan) is JobFailure and nan == JobFailure("non_finite_loss", "loss is nan at step 3")
    assert loop_failure(DatasetError("line 1: not JSON")) == JobFailure("dataset_error", "line 1: not JSON")
    assert loop_failure(RuntimeError("NCCL timeout")) is None  # Ray retries it from the last checkpoint


def test_an_outcome_has_a_failure_exactly_when_it_failed() -> None:
    failure = JobFailure("dataset_error", "bad")
    assert RunOutcome.failed(failure, last_step=2).failure == failure
    with pytest.raises(ValueError):
        RunOutcome("failed")
    with pytest.raises(ValueError):
        RunOutcome("succeeded", 3, failure=failure)


class _Channel:
    """A channel whose `cancel_requested` calls are counted; each answer is ready at once."""

    def __init__(self) -> None:
        self.asked = 0
        self.cancel = False
        self.cancel_requested = self

    def remote(self) -> bool:
        self.asked += 1
        return self.cancel


def test_rank_zero_asks_the_channel_at_most_once_per_poll_and_never_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[Any] = []

    def wait(refs: list[Any], timeout: float) -> tuple[list[Any], list[Any]]:
        waits.append(timeout)
        return refs, []

    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "get", lambda ref: ref)
    channel = _Channel()
    watch = CancelWatch(channel, poll_s=0.2)
    for _ in range(200):  # many steps within one poll interval: one call sent, its answer read once
        assert watch.requested() is False
    assert channel.asked == 1 and set(waits) == {0}
    channel.cancel = True
    time.sleep(0.25)
    assert [watch.requested(), watch.requested()] == [False, True]  # sent, then its answer seen
    assert watch.requested() is True and channel.asked == 2
    assert train_worker.CANCEL_POLL_S <= 1.0
