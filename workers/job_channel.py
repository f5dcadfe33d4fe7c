"""The per-job mailbox actor between Ray Train (controller, rank 0) and the job's driver.

Its own module, importing only `ray`: an actor's process imports the module that defines its class,
and `workers.ray_job` pulls in torch and Ray Train (3.8 s of CPU on a 2-vCPU VM) for what is a list.
"""

from __future__ import annotations

from typing import Any

import ray


@ray.remote(num_cpus=0, max_restarts=0)
class JobChannel:
    """Mailbox between the Train controller / rank 0 and the driver, plus the job's fatal-error record."""

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []
        self._fatal: dict[str, Any] | None = None

    def put(self, item: dict[str, Any]) -> None:
        self._items.append(item)

    def drain(self) -> list[dict[str, Any]]:
        items, self._items = self._items, []
        return items

    def set_fatal(self, error: dict[str, Any]) -> None:
        if self._fatal is None:  # the first rank to fail explains the failure
            self._fatal = error

    def get_fatal(self) -> dict[str, Any] | None:
        return self._fatal
