"""The one failure type of a job, from the training loop through Ray to the store and the API (stdlib only)."""

from __future__ import annotations


class JobFailure(Exception):
    """Why a job failed: `code` is machine-readable, `message` tells a person what happened.

    The loop raises it (core.training.TrainingError is one); a Train worker records it in the job's
    channel; Ray carries it between processes (it pickles with its fields); the driver writes it to the
    store, and the API shows it as the job's ``error: {code, message}``. `retryable` says whether the
    same spec could succeed if run again (a lost worker) or not (unreadable data, a NaN loss).
    Subclasses keep ``(code, message)`` as their constructor's positional arguments, so they pickle too.
    """

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.retryable = retryable

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, JobFailure):
            return NotImplemented
        return (self.code, self.message, self.retryable) == (other.code, other.message, other.retryable)

    def __hash__(self) -> int:
        return hash((self.code, self.message, self.retryable))

    def as_error(self) -> dict[str, str]:
        """The API's `error` of a job that failed this way: ``{code, message}``."""
        return {"code": self.code, "message": self.message}
