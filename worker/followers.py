"""Followers woken as soon as their leader is done, instead of at their next look.

A follower (promptq.single_flight) whose leader is still on its way goes back on the queue to
look again later: a quarter of its age, up to 30 s, so that thousands of followers of slow
leaders do not keep claiming. Their answers would then come up to that long after their
leaders'. `FollowerWaker` notes the followers this worker put back (`watch`) and, every
POLL_S while it has any, asks the database in one query which of their leaders are no longer
in flight; their followers are made due at once (`QueueClient.wake`), at their priority's
place in the queue. A woken follower's claim then takes its leader's answer, or, if the
leader got none, makes its own call or waits for the follower that makes it (and is watched
again, with that one as its leader).

Best effort: if this worker stops (or Redis or the database is away), the followers look
again when their time comes. A follower is watched until its own look is due; one that is
not in the queue any more (it ran) is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from promptq.queue import QueueClient
from promptq.store import JobStore
from worker.background import Background

logger = logging.getLogger(__name__)

#: How often the leaders of watched followers are looked up.
POLL_S = 0.2


@dataclass(slots=True)
class _Watched:
    leader_id: str
    priority: int
    #: monotonic time at which the follower looks again by itself.
    until: float
    #: Its leader is known to be done: the follower is woken, not looked up again.
    leader_done: bool = False


class FollowerWaker(Background):
    """Wakes the followers this worker put back on the queue once their leader is done."""

    TASK_NAME = "promptq-follower-waker"

    def __init__(self, store: JobStore, queue: QueueClient, *, poll_s: float = POLL_S) -> None:
        self.store, self.queue, self.poll_s = store, queue, poll_s
        self._watched: dict[str, _Watched] = {}
        self._noted = asyncio.Event()

    def watch(self, job_id: str, leader_id: str, priority: int, retry_in_s: float) -> None:
        """Wake the follower `job_id` when `leader_id` is done (within `retry_in_s`)."""
        self._watched[job_id] = _Watched(leader_id, priority, time.monotonic() + retry_in_s)
        self._noted.set()

    async def _run(self) -> None:
        while True:
            if not self._watched:
                self._noted.clear()
                await self._noted.wait()
            await asyncio.sleep(self.poll_s)
            try:
                await self.wake_done()
            except (RedisError, OSError, SQLAlchemyError) as exc:
                logger.debug("could not wake followers (%r); they look again later", exc)
            except Exception:  # never let the waker die: followers would only look later
                logger.exception("waking followers failed")

    async def wake_done(self) -> None:
        """One pass: wake the watched followers whose leader is done."""
        now = time.monotonic()
        self._watched = {k: w for k, w in self._watched.items() if w.until > now}
        pending = {w.leader_id for w in self._watched.values() if not w.leader_done}
        flying = await self.store.in_flight(pending) if pending else set()
        # Only the leaders just looked up: one watched meanwhile (`watch` while the query ran,
        # e.g. a follower led to another follower) is looked up at the next pass.
        for watched in self._watched.values():
            if watched.leader_id in pending and watched.leader_id not in flying:
                watched.leader_done = True
        woken = {k: w for k, w in self._watched.items() if w.leader_done}
        answers = await self.queue.wake({k: w.priority for k, w in woken.items()})
        for job_id, code in answers.items():
            # woken, or gone from the queue (it ran already); unless watched anew meanwhile
            if code != 0 and self._watched.get(job_id) is woken[job_id]:
                del self._watched[job_id]
            # 0: not deferred yet (arq puts it back a moment after `watch`): next pass.
