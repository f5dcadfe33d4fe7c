"""Model-hub look-ups for the API: a few threads of their own, an overall deadline, and an offline switch.

`POST /v1/jobs:validate` with a hub id (e.g. `someorg/somemodel`) loads the tokenizer from the hub. The
hub client retries an unreachable hub for a long time (huggingface_hub's backoff, 5 retries), so a load runs
on a thread of its own while the request waits at most `MINORDPO_HUB_TIMEOUT_S`. At most
`MINORDPO_HUB_LOAD_THREADS` loads run at once, counted until each really ends (a timed-out one keeps
its slot); a request that finds them all busy is answered 503 with Retry-After at once, so a burst of
such requests holds at most that many of the request threads that other routes need. The threads are
daemon threads, not a ThreadPoolExecutor, whose workers the interpreter joins at exit: a hung hub call
must not hold up the server's shutdown.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from api.errors import ProblemError
from core.settings import Settings

T = TypeVar("T")
LOC = "model.path"


class HubLoads:
    """Runs hub look-ups on at most `threads` daemon threads, each waited for at most `timeout_s`."""

    def __init__(self, *, threads: int = 2, timeout_s: float = 5.0, offline: bool = False) -> None:
        self.threads = threads
        self.timeout_s = timeout_s
        self.offline = offline
        self._slots = threading.BoundedSemaphore(threads)

    @classmethod
    def from_settings(cls, settings: Settings) -> HubLoads:
        return cls(
            threads=settings.hub_load_threads, timeout_s=settings.hub_timeout_s, offline=settings.hub_offline
        )

    def refuse_offline(self, model_id: str, *, loc: str = LOC, offline_msg: str | None = None) -> None:
        """A 422 naming `loc` if this server is offline (no hub: the model must be a local folder)."""
        if self.offline:
            msg = offline_msg or (
                f"'{model_id}' is a model hub id, but this server is offline (MINORDPO_HUB_OFFLINE or "
                "HF_HUB_OFFLINE): the model must be a local folder under the allowed paths"
            )
            raise ProblemError(422, f"{loc}: {msg}", errors=[{"loc": loc, "msg": msg}])

    def run(
        self,
        model_id: str,
        load: Callable[[], T],
        *,
        loc: str = LOC,
        offline_msg: str | None = None,
        check_offline: bool = True,
    ) -> T:
        """`load()` for hub id `model_id`, or a ProblemError naming `loc`: 422 offline or past the deadline, 503 busy."""
        if check_offline:
            self.refuse_offline(model_id, loc=loc, offline_msg=offline_msg)
        if not self._slots.acquire(blocking=False):
            raise ProblemError(
                503,
                f"{self.threads} model hub look-ups are already under way; retry later, or give a local folder",
                headers={"Retry-After": str(max(1, math.ceil(self.timeout_s)))},
            )
        future: Future[T] = Future()
        threading.Thread(target=self._work, args=(load, future), name="hub-load", daemon=True).start()
        try:
            return future.result(timeout=self.timeout_s)
        except TimeoutError:
            msg = (
                f"the model hub did not answer for '{model_id}' within {self.timeout_s:g} s "
                "(MINORDPO_HUB_TIMEOUT_S); check the hub id and the server's network, or give a local "
                + ("folder" if loc == LOC else "file")
            )
            raise ProblemError(422, f"{loc}: {msg}", errors=[{"loc": loc, "msg": msg}]) from None

    def _work(self, load: Callable[[], T], future: Future[T]) -> None:
        try:
            future.set_result(load())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request (or dropped after its deadline)
            future.set_exception(exc)
        finally:
            self._slots.release()
