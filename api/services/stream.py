"""One shared store poller per job (`StreamHub`), fanning new messages out to every SSE subscriber."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from anyio import to_thread

from api.services.stream_reads import Batch, Cursor, Message, head, read_after
from core.store import Database

log = logging.getLogger("api.stream")
QUEUE_BATCHES = 256


def _env_float(name: str, default: float) -> float:
    try:
        return max(0.01, float(os.environ.get(name, default)))
    except ValueError:
        return default


@dataclass(eq=False)
class Subscriber:
    """One viewer: batches from the feed; `overflow` set when it fell behind (it then re-reads the store)."""

    feed: Feed
    queue: asyncio.Queue[list[Message] | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_BATCHES))
    overflow: bool = False

    def offer(self, item: list[Message] | None) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflow = True


@dataclass(eq=False)
class Feed:
    """The live poller of one job: its read position and its subscribers."""

    job_id: str
    subscribers: set[Subscriber] = field(default_factory=set)
    cursor: Cursor | None = None
    task: asyncio.Task[None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # set once `cursor` was read


class StreamHub:
    """Per-process registry of job feeds: the first subscriber of a job starts its poller, the last stops it.

    Each feed reads the store once per `poll_interval` (events, metric rows and the job's status
    after the highest ids it has seen), however many clients watch the job, and stops by itself
    after broadcasting the job's terminal status. Counters `feeds_started` and `polls` are for
    tests and diagnostics.
    """

    def __init__(
        self, db: Database, *, poll_interval: float | None = None, heartbeat: float | None = None
    ) -> None:
        self.db = db
        self.poll_interval = poll_interval or _env_float("MINORDPO_SSE_POLL_S", 0.5)
        self.heartbeat = heartbeat or _env_float("MINORDPO_SSE_HEARTBEAT_S", 15.0)
        self.feeds: dict[str, Feed] = {}
        self.feeds_started = 0
        self.polls = 0

    def subscribe(self, job_id: str) -> Subscriber:
        """Register a viewer of `job_id`, starting the job's feed if it has none."""
        feed = self.feeds.get(job_id)
        if feed is None:
            feed = self.feeds[job_id] = Feed(job_id)
            feed.task = asyncio.get_running_loop().create_task(self._run(feed), name=f"sse-feed-{job_id}")
            self.feeds_started += 1
        sub = Subscriber(feed)
        feed.subscribers.add(sub)
        return sub

    def unsubscribe(self, job_id: str, sub: Subscriber) -> None:
        """Remove a viewer; the feed stops when its last viewer leaves."""
        feed = self.feeds.get(job_id)
        if feed is None:
            return
        feed.subscribers.discard(sub)
        if not feed.subscribers:
            del self.feeds[job_id]
            if feed.task is not None:
                feed.task.cancel()

    async def read(self, job_id: str, cursor: Cursor) -> Batch:
        """One store read after `cursor` (off the event loop)."""
        return await to_thread.run_sync(read_after, self.db, job_id, cursor)

    async def _run(self, feed: Feed) -> None:
        try:
            while True:
                try:
                    cursor, hurry = await to_thread.run_sync(head, self.db, feed.job_id)
                    break
                except Exception:
                    log.exception("SSE feed of job %s could not read the store", feed.job_id)
                    await asyncio.sleep(self.poll_interval)
            feed.cursor = cursor
            feed.ready.set()
            while True:
                if not hurry:
                    await asyncio.sleep(self.poll_interval)
                hurry = False
                try:
                    batch = await self.read(feed.job_id, cursor)
                except Exception:  # a database hiccup: keep the viewers, try again next tick
                    log.exception("SSE feed of job %s could not read the store", feed.job_id)
                    continue
                self.polls += 1
                cursor = feed.cursor = batch.cursor
                if batch.messages:
                    for sub in list(feed.subscribers):
                        sub.offer(batch.messages)
                if batch.more:
                    hurry = True  # read the rest at once
                elif batch.terminal:
                    for sub in list(feed.subscribers):
                        sub.offer(None)
                    return
        finally:
            if self.feeds.get(feed.job_id) is feed:
                del self.feeds[feed.job_id]

    async def stream(self, job_id: str, cursor: Cursor, terminal: bool) -> AsyncIterator[Message | None]:
        """Messages after `cursor` until the job is terminal and all is sent; None = heartbeat due.

        Subscribes first (when the job is not yet terminal) and waits until the feed has read its
        starting point, then catches up from the store (so the catch-up reaches at least where the
        feed starts), then follows the shared feed, dropping what the catch-up already sent
        (`Cursor.takes`). A viewer that fell behind the feed (queue full) catches up again.
        """
        sub = None if terminal else self.subscribe(job_id)
        try:
            if sub is not None:
                await sub.feed.ready.wait()
            catch_up = True
            while True:
                if catch_up or (sub is not None and sub.overflow):
                    catch_up = False
                    if sub is not None and sub.overflow:
                        sub.overflow = False
                        while not sub.queue.empty():
                            sub.queue.get_nowait()
                    done = False
                    async for batch in self._catch_up(job_id, cursor):
                        for message in batch.messages:
                            cursor = cursor.after(message)
                            yield message
                        done = batch.terminal and not batch.more
                    if done or sub is None:
                        return
                try:
                    item = await asyncio.wait_for(sub.queue.get(), self.heartbeat)
                except TimeoutError:
                    yield None
                    continue
                if item is None:
                    return
                for message in item:
                    if cursor.takes(message):
                        cursor = cursor.after(message)
                        yield message
        finally:
            if sub is not None:
                self.unsubscribe(job_id, sub)

    async def _catch_up(self, job_id: str, cursor: Cursor) -> AsyncIterator[Batch]:
        """Batches of everything stored after `cursor`, until a read finds no more."""
        while True:
            batch = await self.read(job_id, cursor)
            yield batch
            cursor = batch.cursor
            if not batch.more:
                return
