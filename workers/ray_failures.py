"""Ray's own exceptions as JobFailures: the one place that knows them (either side of Ray; imports ray.exceptions).

The fit task maps a failed Ray Train run here, and the driver a lost fit task, so a lost worker, an
out-of-memory kill and a lost node reach the store with the same codes whichever process saw them.
"""

from __future__ import annotations

from ray import exceptions as ray_errors

from core.failures import JobFailure
from workers.ray_compat import TRAIN_USER_ERROR_ATTR

OOM_TYPE_NAME = "OutOfMemoryError"
"""The class name of both Ray's and torch's out-of-memory errors (torch is not imported on the driver)."""
OOM_WORDS = ("low on memory", "memory monitor", "OutOfMemory", "out of memory")
"""How Ray words the death of a process its memory monitor killed (an ActorDiedError carries only text)."""
MESSAGE_LIMIT = 500
PROCESS_LOSSES = ("worker_lost", "out_of_memory", "node_lost")
PEER_LOST_TYPES = ("DistNetworkError",)
"""torch.distributed's error when a collective's peer went away (by name: the driver imports no torch)."""
PEER_LOST_WORDS = ("Connection closed by peer", "Connection reset by peer")
"""How gloo words a collective whose peer process died."""
WRAPPED_BY = ("cause", "health_check_failure", TRAIN_USER_ERROR_ATTR)
"""Where Ray keeps the exception it wraps: RayTaskError.cause, Ray Train's WorkerHealthCheckFailedError
(a lost worker process) and UserExceptionWithTraceback (the loop's own error; a private name, kept in
workers/ray_compat.py)."""


def failure_from_ray(exc: BaseException, *, retries: int = 0) -> JobFailure:
    """The JobFailure that an exception out of Ray (a failed `fit()`, a lost task) stands for.

    A JobFailure raised in a worker comes back as itself (from any rank); Ray Train's worker-group
    error is explained by its lowest rank whose process was lost, else its lowest failing rank;
    a controller error by its cause.
    """
    exc = _cause(exc)
    if isinstance(exc, JobFailure):
        return exc
    worker_failures: dict[int, BaseException] = getattr(exc, "worker_failures", None) or {}
    for err in worker_failures.values():
        if isinstance(_cause(err), JobFailure):
            return _cause(err)  # type: ignore[return-value]
    if worker_failures:
        causes = {rank: _cause(err) for rank, err in worker_failures.items()}

        def explains(rank: int) -> tuple[int, int]:
            """A lost process first, then any other error, last a collective that only lost its peer."""
            if _peer_lost(causes[rank]):
                return 2, rank
            return (0 if _classify(causes[rank], "", retries).code in PROCESS_LOSSES else 1), rank

        rank = min(causes, key=explains)
        return _classify(causes[rank], f"worker rank {rank}", retries)
    controller_failure = getattr(exc, "controller_failure", None)
    if isinstance(controller_failure, BaseException):
        return _classify(_cause(controller_failure), "the Train controller", retries)
    return _classify(exc, "the run", retries)


def _classify(exc: BaseException, who: str, retries: int) -> JobFailure:
    text = short_error(exc)
    after = f" ({retries} retries used up)" if retries else ""
    if _out_of_memory(exc):
        return JobFailure("out_of_memory", f"{who} ran out of memory{after}: {text}"[:MESSAGE_LIMIT])
    if isinstance(exc, ray_errors.NodeDiedError) or getattr(exc, "preempted", False):
        return JobFailure("node_lost", f"{who} lost its node{after}: {text}"[:MESSAGE_LIMIT], retryable=True)
    if isinstance(
        exc, ray_errors.RayActorError | ray_errors.WorkerCrashedError | ray_errors.LocalRayletDiedError
    ):
        return JobFailure("worker_lost", f"{who} was lost{after}: {text}"[:MESSAGE_LIMIT], retryable=True)
    if _peer_lost(exc):
        message = f"{who} failed because another rank was lost{after}: {text}"
        return JobFailure("worker_lost", message[:MESSAGE_LIMIT], retryable=True)
    if isinstance(exc, ray_errors.RayError):
        return JobFailure("ray_error", f"{who} failed in Ray{after}: {text}"[:MESSAGE_LIMIT], retryable=True)
    return JobFailure("worker_error", f"{who} failed{after}: {text}"[:MESSAGE_LIMIT])


def _peer_lost(exc: BaseException) -> bool:
    """A collective that failed because another rank's process went away."""
    return type(exc).__name__ in PEER_LOST_TYPES or any(w in str(exc) for w in PEER_LOST_WORDS)


def _cause(exc: BaseException) -> BaseException:
    """The exception a Ray wrapper stands for: a task's user error, a Train worker's error or lost process."""
    for _ in range(8):  # wrappers nest (a Train worker's wrapper around a task error); never loop forever
        inner = next((getattr(exc, name, None) for name in WRAPPED_BY if hasattr(exc, name)), None)
        if not isinstance(inner, BaseException) or inner is exc:
            return exc
        exc = inner
    return exc


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, ray_errors.OutOfMemoryError) or type(exc).__name__ == OOM_TYPE_NAME:
        return True
    return isinstance(exc, ray_errors.RayActorError) and any(w in str(exc) for w in OOM_WORDS)


def short_error(exc: BaseException | None, limit: int = MESSAGE_LIMIT) -> str:
    """`Type: last line of the message`, without a traceback (what a person reads in the job's error)."""
    if exc is None:
        return "unknown error"
    exc = _cause(exc)
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1].strip() if lines else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:limit]
