"""Interactive retries: off the worker during their backoff, ahead of bulk work after it.

A retry goes back on the queue deferred by its backoff (arq's `Retry(defer=...)`), which
frees its worker slot for other jobs meanwhile. But arq's score is the due time, so when the
backoff ends an interactive job would be due behind every bulk job due before it: a whole
backlog. `AheadAgain.after` therefore moves it back to its priority's score once its backoff
has ended (`QueueClient.move_ahead`), as it had when first queued.

Best effort: if this worker stops (or Redis is away) before then, the job still runs when its
backoff ends, in due-time order.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from promptq.queue import QueueClient

logger = logging.getLogger(__name__)


class AheadAgain:
    """Moves retrying interactive jobs ahead of bulk work when their backoff ends."""

    def __init__(self, queue: QueueClient) -> None:
        self.queue = queue
        self._timers: set[asyncio.Task[None]] = set()

    def after(self, delay_s: float, job_id: str, priority: int) -> None:
        """In `delay_s`, give the queued job `job_id` its `priority`'s place again."""
        timer = asyncio.create_task(self._later(delay_s, job_id, priority))
        self._timers.add(timer)
        timer.add_done_callback(self._timers.discard)

    async def _later(self, delay_s: float, job_id: str, priority: int) -> None:
        await asyncio.sleep(delay_s)
        try:
            await self.queue.move_ahead(job_id, priority)
        except (RedisError, OSError) as exc:
            logger.warning(
                "could not move job %s ahead of bulk work (%s); it runs in due-time order",
                job_id,
                exc.__class__.__name__,
            )

    async def stop(self) -> None:
        """Drop the pending moves (their jobs run in due-time order)."""
        for timer in self._timers:
            timer.cancel()
        await asyncio.gather(*self._timers, return_exceptions=True)
