"""The one failure type: it survives pickling (Ray carries it between processes) with its class and fields."""

from __future__ import annotations

import pickle

import pytest

from core.failures import JobFailure
from core.training import TrainingError


@pytest.mark.parametrize(
    "failure",
    [
        JobFailure("dataset_error", "line 3 of train.jsonl is not JSON"),
        JobFailure("worker_lost", "worker rank 1 was lost", retryable=True),
        TrainingError("non_finite_loss", "loss is nan at step 3"),
    ],
)
def test_a_failure_pickles_with_its_class_code_message_and_retryable(failure: JobFailure) -> None:
    back = pickle.loads(pickle.dumps(failure))
    assert type(back) is type(failure)
    assert (back.code, back.message, back.retryable) == (failure.code, failure.message, failure.retryable)
    assert back == failure and hash(back) == hash(failure)


def test_a_training_error_is_a_job_failure_with_the_apis_error_shape() -> None:
    error = TrainingError("non_finite_loss", "loss is nan at step 3")
    assert isinstance(error, JobFailure) and not error.retryable
    assert error.as_error() == {"code": "non_finite_loss", "message": "loss is nan at step 3"}
    assert str(error) == "non_finite_loss: loss is nan at step 3"
    assert JobFailure("a", "b") != JobFailure("a", "c") and JobFailure("a", "b") != JobFailure(
        "a", "b", retryable=True
    )
