"""Fair admission to the query workers: a share of them per caller, and waiting callers served in turn.

Why: with one first-come queue, a caller with many streams holds every worker
and every waiting place, and every other caller is refused. Here a caller (the
token's client) runs at most ``share`` queries at once and waits in a queue of
its own; a worker that frees up goes to the next caller in turn (round-robin
over the callers that wait), so a caller with one query waits for at most one
query of each other caller. Each caller's queue is bounded, and when the
waiting room as a whole is full, a newcomer takes the place of the newest
waiter of the caller with the most waiting, so filling the room with one
client's queries does not lock the others out either.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class Refused(Exception):
    """A query that may not run or wait; ``message`` names the bound.

    ``reason`` is ``caller_share`` when the caller's own share was the bound (a metric label), else ''.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


class FairQueue:
    """At most ``slots`` holders at once, at most ``share`` of them per caller; waiters served round-robin by caller.

    Runs on one event loop and is not thread-safe (the server's calls all run on its loop).
    """

    def __init__(self, slots: int, share: int, max_waiting: int, max_waiting_per_caller: int) -> None:
        self.slots = slots
        self.share = min(share, slots)
        self.max_waiting = max_waiting
        self.max_waiting_per_caller = max_waiting_per_caller
        self.active = 0
        self.waiting = 0
        self._running: dict[str, int] = {}
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}
        """Callers with waiters, in turn order (a dict keeps insertion order; served callers move to the end)."""

    def running(self, caller: str) -> int:
        """Slots ``caller`` holds now."""
        return self._running.get(caller, 0)

    def queued(self, caller: str) -> int:
        """Waiters ``caller`` has now."""
        queue = self._queues.get(caller)
        return len(queue) if queue is not None else 0

    @contextlib.asynccontextmanager
    async def slot(self, caller: str, wait_s: float) -> AsyncIterator[None]:
        """Hold one slot for ``caller`` (waiting at most ``wait_s``); Refused if it may not wait or none came."""
        await self.acquire(caller, wait_s)
        try:
            yield
        finally:
            self.release(caller)

    async def acquire(self, caller: str, wait_s: float) -> None:
        """Take a slot now, or wait in ``caller``'s queue for at most ``wait_s``; Refused otherwise."""
        if self.active < self.slots and self.running(caller) < self.share:
            self._take(caller)  # a free slot means nobody who may use it is waiting: dispatch is eager
            return
        queued = self.queued(caller)
        if queued >= self.max_waiting_per_caller:
            raise Refused(
                f"client {caller!r} already has {self.running(caller)} queries running and {queued} waiting "
                f"(max_queries_per_caller {self.share}, max_waiting_per_caller {self.max_waiting_per_caller}); "
                "try again shortly",
                "caller_share",
            )
        if self.waiting >= self.max_waiting:
            self._make_room(queued)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(caller, deque()).append(future)
        self.waiting += 1
        try:
            async with asyncio.timeout(wait_s):
                await future
        except BaseException as exc:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(caller)  # the slot came just as the wait ended: hand it on
            else:
                self._forget(caller, future)
            if isinstance(exc, TimeoutError):
                raise Refused(
                    f"all query slots open to this caller stayed busy for {wait_s:.2g} s (max_concurrent_queries "
                    f"{self.slots}, max_queries_per_caller {self.share}); try again"
                ) from None
            raise

    def release(self, caller: str) -> None:
        """Give back a slot of ``caller`` and hand free slots to the waiters whose turn it is."""
        self.active -= 1
        left = self._running[caller] - 1
        if left:
            self._running[caller] = left
        else:
            del self._running[caller]
        self._dispatch()

    def _take(self, caller: str) -> None:
        self.active += 1
        self._running[caller] = self._running.get(caller, 0) + 1

    def _dispatch(self) -> None:
        """While a slot is free, grant it to the first caller in turn order that is below its share."""
        while self.active < self.slots:
            caller = next((name for name in self._queues if self.running(name) < self.share), None)
            if caller is None:
                return
            queue = self._queues.pop(caller)
            future = queue.popleft()
            self.waiting -= 1
            if queue:
                self._queues[caller] = queue  # to the end of the turn order
            if future.done():  # cancelled, its task not yet told: not a waiter any more
                continue
            self._take(caller)
            future.set_result(None)

    def _make_room(self, queued: int) -> None:
        """Drop, from a full waiting room, the newest waiter of the caller with the most, if it has clearly more."""
        longest = max(self._queues, key=self.queued, default=None)
        if longest is None or self.queued(longest) <= queued + 1:
            raise Refused(
                f"too many queries: {self.active} running and {self.waiting} waiting "
                "(max_concurrent_queries, max_waiting_queries); try again shortly"
            )
        queue = self._queues[longest]
        dropped = queue.pop()
        self.waiting -= 1
        if not queue:
            del self._queues[longest]
        if not dropped.done():
            dropped.set_exception(
                Refused(
                    f"the waiting room is full (max_waiting_queries {self.max_waiting}) and client {longest!r} had "
                    "the most queries waiting; this one gave its place to another caller's; try again shortly",
                    "caller_share",
                )
            )

    def _forget(self, caller: str, future: asyncio.Future[None]) -> None:
        """Remove a waiter that stopped waiting (timed out, cancelled, dropped) if it is still queued."""
        queue = self._queues.get(caller)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(future)
            self.waiting -= 1
        if not queue:
            del self._queues[caller]
