"""A worker's model slots: how many of its jobs may work with the model at once.

Only `concurrency` of a worker's jobs at a time do their model work (a prompt job's call, a
summarize job's map-reduce). Up to `prefetch` more are prefetched: already taken from the queue
and claimed in SQL, waiting here for a slot. So the bookkeeping around each call (taking the
next job from Redis, the claim's SQL commit, the status event, and after the call the result's
SQL commit) overlaps other jobs' calls instead of leaving a slot idle between two calls, and the
model is kept as busy as the concurrency allows. Jobs past their model work, still recording
their outcome, are `finishing`: they don't count against the prefetch (worker.fastpoll takes the
next job as soon as a slot is given up, not when the job that held it ends).

A bulk job of an endpoint with limits waits for its slot before it is claimed (`take`, then
`hold` with the ticket), so that it takes its limit permit only once it can use it.

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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any


class SlotsClosed(Exception):
    """The worker is stopping: no more model work starts here."""


@dataclass(slots=True)
class Ticket:
    """A slot taken ahead (`ModelSlots.take`), until a `hold` block takes it over."""

    held: bool = True


class ModelSlots:
    """At most `size` holders at once; waiters served by rank (lowest first), then arrival."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a worker needs at least one model slot")
        self.size = size
        #: Slots held now.
        self.in_use = 0
        #: (rank, arrival, future, tag) of each job waiting for a slot, as a heap.
        self._waiters: list[tuple[float, int, asyncio.Future[None], object]] = []
        self._arrivals = itertools.count()
        self.closed = False
        #: Called when a holder gives its slot up (the worker polls for more jobs).
        self.on_release: Callable[[], None] = lambda: None
        self._past: set[asyncio.Task[Any]] = set()

    @property
    def waiting(self) -> int:
        """Jobs waiting for a slot (prefetched)."""
        return sum(not future.done() for _, _, future, _ in self._waiters)

    def wanted(self, excluding: object = None) -> bool:
        """True if a job waits for a slot (one whose `take` tag is not `excluding`)."""
        return any(
            not future.done() and (excluding is None or tag != excluding)
            for _, _, future, tag in self._waiters
        )

    @property
    def finishing(self) -> int:
        """Jobs (tasks) past their model work that have not ended: recording the outcome."""
        self._past = {task for task in self._past if not task.done()}
        return len(self._past)

    async def take(self, rank: float = 0, tag: object = None) -> Ticket:
        """Wait for a slot (lower `rank` first) to use later in `hold`, or to `give_back`.

        `tag` says what the job needs next (the limits it waits on: `wanted(excluding=tag)`).
        """
        await self._acquire(rank, tag)
        return Ticket()

    def give_back(self, ticket: Ticket) -> None:
        """Give back a slot from `take` that no `hold` block took over (else do nothing)."""
        if ticket.held:
            ticket.held = False
            self._release()
            self.on_release()

    @asynccontextmanager
    async def hold(self, rank: float = 0, ticket: Ticket | None = None) -> AsyncIterator[None]:
        """Wait for a slot (lower `rank` first), or take over `ticket`'s, and hold it inside
        the block.

        Afterwards the calling task counts as finishing until it ends, and `on_release` is
        called: the worker may take another job ahead.
        """
        if ticket is not None and ticket.held:
            ticket.held = False
        else:
            await self._acquire(rank)
        try:
            yield
        except BaseException:
            self._release()
            self._finishing()
            raise
        handed_over = self._release()
        self._finishing()
        if handed_over:
            # Let the waiter start its model call before this job records its result: one
            # turn of the loop for the waiter, one for a task it starts (aiohttp sends a
            # request's body from a task of its own before Python 3.12).
            await asyncio.sleep(0)
            await asyncio.sleep(0)

    def close(self) -> None:
        """Turn away every waiting and later job with SlotsClosed (holders carry on)."""
        self.closed = True
        for _, _, future, _ in self._waiters:
            if not future.done():
                future.set_exception(SlotsClosed())
        self._waiters.clear()

    async def _acquire(self, rank: float, tag: object = None) -> None:
        if self.closed:
            raise SlotsClosed()
        # A free slot means nobody waits: _release hands a slot to a waiter before freeing it.
        if self.in_use < self.size:
            self.in_use += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rank, next(self._arrivals), future, tag))
        try:
            await future  # resolved by _release, which hands its slot over
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # handed a slot as we were cancelled: pass it on
            raise

    def _finishing(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._past.add(task)
        self.on_release()

    def _release(self) -> bool:
        """Hand the slot to the first waiter (True), else free it."""
        while self._waiters:
            _, _, future, _ = heapq.heappop(self._waiters)
            if not future.done():  # skip waiters that were cancelled
                future.set_result(None)  # the slot passes on: in_use stays the same
                return True
        self.in_use -= 1
        return False
