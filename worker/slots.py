"""A worker's model slots: how many of its jobs may work with the model at once.

A worker holds up to `concurrency + prefetch` jobs (arq's `max_jobs`), but only `concurrency`
of them at a time do their model work (a prompt job's call, a summarize job's map-reduce).
The others are prefetched: already taken from the queue and claimed in SQL, waiting here for a
slot. So the bookkeeping around each call (taking the next job from Redis, the claim's SQL
commit, the status event, and after the call the result's SQL commit) overlaps other jobs'
calls instead of leaving a slot idle between two calls, and the model is kept as busy as the
concurrency allows.

A freed slot goes to the waiting job that comes first in the queue's order, and that job runs
before the one that freed it goes on to record its result, so its model call starts at once: the
lowest arq score (its due time; interactive jobs are scored days earlier than bulk ones), then
the one that has waited longest. A job cancelled while it waits leaves the line; one cancelled
just as it was handed a slot gives the slot back. When the worker starts to stop, `close()`
turns the waiting jobs away (SlotsClosed): they are handed back to the queue, uncharged, instead
of starting model work during the grace period.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class SlotsClosed(Exception):
    """The worker is stopping: no more model work starts here."""


class ModelSlots:
    """At most `size` holders at once; waiters served by rank (lowest first), then arrival."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a worker needs at least one model slot")
        self.size = size
        #: Slots held now.
        self.in_use = 0
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()
        self.closed = False

    @property
    def waiting(self) -> int:
        """Jobs waiting for a slot (prefetched)."""
        return sum(not future.done() for _, _, future in self._waiters)

    @asynccontextmanager
    async def hold(self, rank: float = 0) -> AsyncIterator[None]:
        """Wait for a slot (lower `rank` first) and hold it inside the block."""
        await self._acquire(rank)
        try:
            yield
        except BaseException:
            self._release()
            raise
        if self._release():
            # Let the waiter start its model call before this job records its result: one
            # turn of the loop for the waiter, one for a task it starts (aiohttp sends a
            # request's body from a task of its own before Python 3.12).
            await asyncio.sleep(0)
            await asyncio.sleep(0)

    def close(self) -> None:
        """Turn away every waiting and later job with SlotsClosed (holders carry on)."""
        self.closed = True
        for _, _, future in self._waiters:
            if not future.done():
                future.set_exception(SlotsClosed())
        self._waiters.clear()

    async def _acquire(self, rank: float) -> None:
        if self.closed:
            raise SlotsClosed()
        # A free slot means nobody waits: _release hands a slot to a waiter before freeing it.
        if self.in_use < self.size:
            self.in_use += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rank, next(self._arrivals), future))
        try:
            await future  # resolved by _release, which hands its slot over
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # handed a slot as we were cancelled: pass it on
            raise

    def _release(self) -> bool:
        """Hand the slot to the first waiter (True), else free it."""
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():  # skip waiters that were cancelled
                future.set_result(None)  # the slot passes on: in_use stays the same
                return True
        self.in_use -= 1
        return False
