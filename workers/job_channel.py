"""The per-job mailbox actor between Ray Train (controller, rank 0) and the job's driver.

Its own module, importing only `ray` and the stdlib-only core.failures: an actor's process imports the
module that defines its class, and `workers.ray_job` pulls in torch and Ray Train for what is a list.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import ray

from core.failures import JobFailure


@ray.remote(num_cpus=0, max_restarts=0)
class JobChannel:
    """Mailbox between the Train controller / rank 0 and the driver, the job's fatal failure and its cancel flag.

    An async actor: `drain(wait_s)` returns as soon as an item arrives (a long poll), so a metric row
    reaches the driver in milliseconds rather than at its next poll. The driver sets the cancel flag
    (`request_cancel`); rank 0 asks for it between steps and stops every rank at the same step.
    """

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []
        self._fatal: JobFailure | None = None
        self._cancel = False
        self._arrived = asyncio.Event()

    async def put(self, item: dict[str, Any]) -> None:
        self._items.append(item)
        self._arrived.set()

    async def drain(self, wait_s: float = 0.0) -> list[dict[str, Any]]:
        """Every item put since the last drain, waiting up to `wait_s` seconds for one if there is none."""
        if not self._items and wait_s > 0:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), wait_s)
        items, self._items = self._items, []
        return items

    async def set_fatal(self, failure: JobFailure) -> None:
        if self._fatal is None:  # the first rank to fail explains the failure
            self._fatal = failure

    async def get_fatal(self) -> JobFailure | None:
        return self._fatal

    async def request_cancel(self) -> None:
        """Ask the run to stop at its next step (it saves a checkpoint and ends cancelled)."""
        self._cancel = True

    async def cancel_requested(self) -> bool:
        return self._cancel
