"""The per-job mailbox actor between Ray Train (controller, rank 0) and the job's driver.

Its own module, importing only `ray`: an actor's process imports the module that defines its class,
and `workers.ray_job` pulls in torch and Ray Train (3.8 s of CPU on a 2-vCPU VM) for what is a list.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import ray


@ray.remote(num_cpus=0, max_restarts=0)
class JobChannel:
    """Mailbox between the Train controller / rank 0 and the driver, plus the job's fatal-error record.

    An async actor: `drain(wait_s)` returns as soon as an item arrives (a long poll), so a metric row
    reaches the driver in milliseconds rather than at its next poll.
    """

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []
        self._fatal: dict[str, Any] | None = None
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

    async def set_fatal(self, error: dict[str, Any]) -> None:
        if self._fatal is None:  # the first rank to fail explains the failure
            self._fatal = error

    async def get_fatal(self) -> dict[str, Any] | None:
        return self._fatal
