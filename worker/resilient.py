"""An arq Worker that outlives Redis restarts and stops gracefully.

arq's `Worker.main` exits on the first `redis.exceptions.ConnectionError` (arq #435, #498).
This subclass catches Redis errors where arq's poll loop would let them escape, waits with
capped exponential backoff, and polls again; redis-py reconnects by itself once Redis answers.
Jobs running meanwhile carry on (the LLM and the database don't need Redis) and write their
results to SQL; whatever Redis forgot, the reconciler re-enqueues from SQL.

Three arq methods are wrapped, each for one reason:
* `main`: retry the first connection instead of giving up after arq's 5 tries (`_connect`,
  which `worker.fastpoll.FastPollWorker.main` uses too);
* `_poll_iteration`: a Redis error (including one re-raised from a finished job's task)
  backs off instead of ending the worker (the poll itself is `_poll_once`, arq's by default);
* `start_jobs`: a Redis error between taking a job slot and starting the job gives the slot
  back (arq would leak it, and after a few outages the worker would take no more jobs); and a
  job this worker already runs is not started a second time (after a lapsed lease the
  reconciler makes it available again), which arq would mishandle.
`close` also tolerates Redis being down, so on_shutdown still runs, and a second SIGTERM or
SIGINT during the grace period cancels the in-flight jobs at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from arq import Worker
from arq.connections import create_pool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from promptq import logs

logger = logging.getLogger(__name__)

#: What counts as "Redis is away": refused, reset, timed out, still loading its data.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
#: Reconnect backoff: full jitter on BASE·2^n, capped.
RECONNECT_BASE_S = 0.1
RECONNECT_CAP_S = 5.0


class ResilientWorker(Worker):
    """arq's Worker, kept alive through Redis outages (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._failures = 0
        self._stopping = False
        #: Slots given back so far (arq gives one back as each job task ends).
        self._slots_released = 0
        #: Called once, when the worker starts to stop (a signal, or close()).
        self.stop_hooks: list[Callable[[], None]] = []

    async def main(self) -> None:
        """Connect (retrying for as long as it takes), then run arq's main loop."""
        await self._connect()
        await super().main()

    async def _connect(self) -> None:
        """Create the Redis pool, retrying with backoff for as long as Redis is away."""
        while self._pool is None:
            try:
                self._pool = await create_pool(
                    self.redis_settings,
                    job_deserializer=self.job_deserializer,
                    job_serializer=self.job_serializer,
                    default_queue_name=self.queue_name,
                    expires_extra_ms=self.expires_extra_ms,
                )
            except REDIS_DOWN as exc:
                await self._back_off(exc)
        self._failures = 0

    async def _poll_iteration(self) -> None:
        try:
            await self._poll_once()
        except REDIS_DOWN as exc:
            await self._back_off(exc)
        else:
            if self._failures:
                logger.warning("Redis is back after %d failed poll(s)", self._failures)
            self._failures = 0

    async def _poll_once(self) -> None:
        """One poll: arq's (worker.fastpoll.FastPollWorker claims jobs its own way)."""
        await Worker._poll_iteration(self)

    async def run_job(self, job_id: str, score: int) -> None:
        """arq's run_job, in a task whose log lines all carry the job id (promptq.logs)."""
        logs.bind_job(job_id)
        await super().run_job(job_id, score)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's start_jobs, one id at a time, skipping ids this worker already runs."""
        for job_id in job_ids:
            if self.job_counter >= self.max_jobs:
                return
            running = self.tasks.get(job_id.decode())
            if running is not None and not running.done():
                continue  # arq keys its tasks by job id: one job can't run twice in one worker
            counter, released = self.job_counter, self._slots_released
            try:
                await super().start_jobs([job_id])
            except BaseException:
                # Jobs that ended meanwhile gave their slots back; anything beyond that is the
                # slot arq took for this job before failing to start it.
                if self.job_counter - counter + self._slots_released - released > 0:
                    self._release_sem_dec_counter_on_complete()
                raise

    def _release_sem_dec_counter_on_complete(self) -> None:
        self._slots_released += 1
        super()._release_sem_dec_counter_on_complete()

    async def _back_off(self, exc: BaseException) -> None:
        self._failures += 1
        delay_s = random.uniform(0, min(RECONNECT_CAP_S, RECONNECT_BASE_S * 2**self._failures))
        logger.warning(
            "Redis unavailable (%s); retrying in %.2f s (failure %d)",
            exc.__class__.__name__,
            delay_s,
            self._failures,
        )
        await asyncio.sleep(delay_s)

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        """First signal: stop taking jobs and let in-flight ones finish; second: stop now."""
        if self._stopping:
            logger.info("second %s: cancelling in-flight jobs now", signal.Signals(signum).name)
            self.handle_sig(signum)
            return
        self._stopping = True
        self._run_stop_hooks()
        super().handle_sig_wait_for_completion(signum)

    def handle_sig(self, signum: signal.Signals) -> None:
        """Stop now: arq's, after the stop hooks."""
        self._run_stop_hooks()
        super().handle_sig(signum)

    def _run_stop_hooks(self) -> None:
        hooks, self.stop_hooks = self.stop_hooks, []
        for hook in hooks:
            hook()

    async def close(self) -> None:
        """arq's close, except that a Redis outage doesn't skip on_shutdown."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        with suppress(*REDIS_DOWN):
            await self.pool.delete(self.health_check_key)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        with suppress(*REDIS_DOWN):
            await self.pool.aclose()
        self._pool = None
