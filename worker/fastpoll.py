"""promptq's worker: a ResilientWorker that refills a freed slot at once and wakes on enqueue.

arq's main loop sleeps `poll_delay` between polls, so a slot that frees up, or a job that
arrives, waits for the next poll. `FastPollWorker` waits on an `asyncio.Event` instead. The
event is set when one of these happens:

* a job task of this worker ends (a slot is free);
* a producer publishes on `<queue_name>:wake` (`QueueClient.enqueue` does, after each enqueue);
* a worker puts a job back on the queue (retry, defer, cancel) and publishes the same wake-up.

Between events it still polls every `poll_delay` (the fallback for a lost message), and never
sleeps past the moment the next deferred job (a `Retry(defer=...)`) falls due.

`FastPollWorker` extends `worker.resilient.ResilientWorker`, so it keeps that class's Redis-outage
survival (connect and poll with backoff, slot-leak and double-start guards, `close` that
tolerates Redis being down and does not abort on a job's CancelledError, second-signal stop).
Everything added here survives a Redis restart too: the wake-up listener re-subscribes (and
wakes the loop, in case it missed a message), and the next-due lookup and the burst-mode exit
check treat a Redis error as "don't know yet" and let the loop back off and poll again.

A wake-up is only a hint: jobs are still claimed by arq's own WATCH/MULTI `start_jobs`, so
delivery stays at-least-once and a duplicate or lost message changes nothing but timing.

arq internals this relies on (arq 0.28; pyproject pins `arq<0.29`):

* `Worker.main()` is replaced; its start-up (the pool, via ResilientWorker's retrying
  `_connect`; `ctx["redis"]`, `on_startup`) and its burst-mode exit are repeated here.
* `Worker._poll_iteration()` runs one poll (claim, clean up finished tasks, heartbeat, cron).
* `Worker.start_jobs()` is extended (skip ids known to be running) and then called.
* `Worker._release_sem_dec_counter_on_complete()` is each job task's done callback.
* `Worker.finish_job()` ends a job with `finish=False` when it goes back on the queue.
* Attributes `_pool`, `tasks`, `job_counter`, `max_jobs`, `poll_delay_s`, `burst`,
  `max_burst_jobs`, `allow_pick_jobs`, `_jobs_started()`; the in-progress key prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

from arq.connections import log_redis_info
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from redis.exceptions import RedisError

from promptq.queue import wake_channel
from worker.resilient import REDIS_DOWN, ResilientWorker

logger = logging.getLogger(__name__)

#: Extra sleep past a deferred job's due score, so that it is due when we look (timer slack).
DUE_MARGIN_S = 0.001
#: Fewest queued ids checked per round trip for "running on another worker".
MIN_PREFILTER_BATCH = 4
#: How long start-up waits for the wake-up subscription before it polls without it.
SUBSCRIBE_TIMEOUT_S = 5.0
#: Pause before re-subscribing after the wake-up connection failed.
RESUBSCRIBE_DELAY_S = 1.0


class FastPollWorker(ResilientWorker):
    """ResilientWorker, woken by freed slots and wake-up messages; `poll_delay` is a fallback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wake_channel = wake_channel(self.queue_name)
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Make the main loop poll now."""
        self._wake.set()

    async def main(self) -> None:
        """Start up as arq does, then poll whenever woken (or every `poll_delay_s`)."""
        await self._connect()  # retries for as long as Redis is away
        names = ", ".join(self.functions)
        logger.info("Starting worker for %d functions: %s", len(self.functions), names)
        try:
            await log_redis_info(self.pool, logger.info)
        except REDIS_DOWN as exc:  # Redis went away again just now: the poll loop will wait
            logger.warning("could not read Redis info (%r)", exc)
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)

        subscribed = asyncio.Event()
        listener = asyncio.create_task(self._listen_for_wakeups(subscribed))
        try:
            # Subscribe before the first poll: a job enqueued after that poll then wakes us.
            try:
                async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
                    await subscribed.wait()
            except TimeoutError:
                logger.warning("no wake-up subscription yet; polling every %gs", self.poll_delay_s)
            await self._poll_until_stopped()
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    async def _poll_until_stopped(self) -> None:
        while True:
            self._wake.clear()  # before polling: a wake-up during the poll means poll again
            await self._poll_iteration()
            if self.burst and await self._burst_is_over():
                await asyncio.gather(*self.tasks.values())
                return
            timeout_s = self.poll_delay_s
            if self.allow_pick_jobs and self.job_counter < self.max_jobs:
                timeout_s = min(timeout_s, await self._seconds_until_next_due())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._wake.wait()

    async def _burst_is_over(self) -> bool:
        if 0 <= self.max_burst_jobs <= self._jobs_started():
            return True
        try:
            return bool(await self.pool.zcard(self.queue_name) == 0)
        except (RedisError, OSError):
            return False  # Redis is away: we can't tell; the loop polls (and backs off) again

    async def _seconds_until_next_due(self) -> float:
        """Seconds until the earliest job that is not yet due will be; inf if there is none."""
        now_ms = timestamp_ms()
        try:
            head = await self.pool.zrangebyscore(
                self.queue_name, min=f"({now_ms}", max="+inf", start=0, num=1, withscores=True
            )
        except (RedisError, OSError):
            return math.inf  # Redis is away: the fallback poll will find out

        if not head:
            return math.inf
        return max(0.0, (float(head[0][1]) - now_ms) / 1000 + DUE_MARGIN_S)

    async def _listen_for_wakeups(self, subscribed: asyncio.Event) -> None:
        """Set the wake-up event on every message; re-subscribe (and poll) after a failure.

        `main` cancels this when it ends, which is before `close()` closes the pool.
        """
        while self._pool is not None:  # arq's close() drops the pool
            try:
                async with self._pool.pubsub() as pubsub:
                    await pubsub.subscribe(self.wake_channel)
                    async for message in pubsub.listen():
                        if message["type"] == "subscribe":
                            subscribed.set()
                        self._wake.set()  # on (re)subscribing too: we may have missed some
            except (RedisError, OSError) as exc:
                logger.warning("wake-up subscription lost (%r); polling until it is back", exc)
                await asyncio.sleep(RESUBSCRIBE_DELAY_S)
            except Exception:  # never let the listener die: without it we only poll
                logger.exception("wake-up listener failed; re-subscribing")
                await asyncio.sleep(RESUBSCRIBE_DELAY_S)

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._wake.set()  # a slot is free: refill it now

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """ResilientWorker's claim, skipping ids running here (free) or elsewhere (one trip).

        Running jobs stay at the head of arq's queue, and arq checks each one with a WATCH
        round trip: on every refill that would cost ~3 round trips per running job.
        """
        here = {job_id for job_id, task in self.tasks.items() if not task.done()}
        candidates = [job_id for job_id in job_ids if job_id.decode() not in here]
        if len(candidates) <= self.max_jobs - self.job_counter:
            await super().start_jobs(candidates)  # they are checked anyway: no prefilter needed
            return
        while candidates and self.job_counter < self.max_jobs:
            size = max(2 * (self.max_jobs - self.job_counter), MIN_PREFILTER_BATCH)
            batch, candidates = candidates[:size], candidates[size:]
            async with self.pool.pipeline(transaction=False) as pipe:
                for job_id in batch:
                    pipe.exists(in_progress_key_prefix + job_id.decode())
                running = await pipe.execute()
            idle = [job_id for job_id, busy in zip(batch, running, strict=True) if not busy]
            await super().start_jobs(idle)

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        """arq's finish; a job put back on the queue also wakes the other workers."""
        await super().finish_job(
            job_id,
            finish,
            result_data,
            result_timeout_s,
            keep_result_forever,
            incr_score,
            keep_in_progress,
        )
        if not finish:
            try:
                await self.pool.publish(self.wake_channel, b"")
            except (RedisError, OSError):
                logger.debug("could not publish a wake-up for re-queued job %s", job_id)
