"""Exceptions raised by the store (the API maps them to problem+json responses)."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every store error."""


class NotFoundError(StoreError, LookupError):
    """The job (or other row) does not exist, or is not visible to the caller's project."""


class IdempotencyConflictError(StoreError):
    """The `Idempotency-Key` was already used with a different request body (HTTP 409)."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was already used with a different request body (job {job_id})"
        )
        self.key = key
        self.job_id = job_id


class InvalidCursorError(StoreError, ValueError):
    """A pagination cursor that this store did not produce (HTTP 400)."""
