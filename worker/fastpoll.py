"""promptq's worker: a ResilientWorker that refills a freed slot at once and wakes on enqueue.

arq's main loop sleeps `poll_delay` between polls, so a slot that frees up, or a job that
arrives, waits for the next poll. `FastPollWorker` waits on an `asyncio.Event` instead. The
event is set when one of these happens:

* a job task of this worker ends, or gives up its model slot (worker.slots): it is finishing,
  and finishing jobs (at most one per model slot) don't count against `max_jobs`, so the
  worker takes the next job while the last one records its outcome;
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

A wake-up is only a hint, and a duplicate or lost message changes nothing but timing.

Jobs are claimed by one Lua script per poll (`CLAIM_SCRIPT`) instead of arq's `start_jobs`.
arq reads the first `queue_read_limit` due ids and then takes each with a WATCH / EXISTS /
ZSCORE / MULTI-PSETEX-EXEC round of about four round trips; the script does the same checks
(due, no in-progress marker) and sets the same marker atomically, for as many jobs as there are
free slots, in one round trip. It also looks past ids that are running (they stay at the head
of the queue until they finish), so a worker is not starved when other workers' running jobs
fill arq's read window; and it returns when the next deferred job falls due, so that the loop
knows how long it may sleep without asking again. Delivery stays at-least-once: a job is only
started under its marker, exactly as arq would start it. The script also runs arq's
start-of-job commands on each job it takes (read the job, count the try), so that run_job does
not need a round trip of its own for them (worker.job_start).

arq internals this relies on (arq 0.28; pyproject pins `arq<0.29`):

* `Worker.main()` is replaced; its start-up (the pool, via ResilientWorker's retrying
  `_connect`; `ctx["redis"]`, `on_startup`) and its burst-mode exit are repeated here.
* `Worker._poll_iteration()` is replaced (via ResilientWorker's `_poll_once`): claim, clean up
  finished tasks, heartbeat and cron, as arq does.
* Each job runs as arq's `Worker.run_job(job_id, score)` task (its start transaction answered
  by the claim: see worker.job_start for what that relies on), with
  `_release_sem_dec_counter_on_complete()` as its done callback, counted in `job_counter` and
  `sem`, kept in `tasks`; arq's marker TTL is `in_progress_timeout_s`.
* `Worker.finish_job()` ends a job with `finish=False` when it goes back on the queue; its
  `finish=True` case without a result is written in batches (worker.finishes), with the same
  commands on the same keys (`job_key_prefix`, `retry_key_prefix`, `abort_jobs_ss`).
* Attributes `_pool`, `tasks`, `job_counter`, `max_jobs`, `poll_delay_s`, `burst`,
  `max_burst_jobs`, `allow_pick_jobs`, `_jobs_started()`, `heart_beat()`; the in-progress key
  prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Coroutine
from typing import Any

from arq.connections import log_redis_info
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.utils import timestamp_ms
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from promptq.outage import OutageLog
from promptq.queue import wake_channel
from worker.finishes import BatchedFinish
from worker.job_start import ARQ_TRY_TTL_S, answer_job_starts, started
from worker.resilient import REDIS_DOWN, ResilientWorker
from worker.slots import ModelSlots

logger = logging.getLogger(__name__)

#: Extra sleep past a deferred job's due score, so that it is due when we look (timer slack).
DUE_MARGIN_S = 0.001
#: Most queue entries one claim looks at (running jobs at the head of the queue included).
CLAIM_SCAN_LIMIT = 10_000
#: KEYS[1]: the queue. ARGV: now (ms), slots to fill, in-progress key prefix, marker TTL (ms),
#: scan limit, job key prefix, try counter prefix, try counter TTL (s). Takes up to ARGV[2] due
#: jobs that have no in-progress marker, setting one on each as arq does, and runs arq's
#: start-of-job commands on it (worker.job_start); returns {{id, score, job, try count, ...},
#: the score of the next job not yet due, or false}.
CLAIM_SCRIPT = """
local queue, now, want = KEYS[1], ARGV[1], tonumber(ARGV[2])
local prefix, ttl, scan = ARGV[3], ARGV[4], tonumber(ARGV[5])
local job_prefix, try_prefix, try_ttl = ARGV[6], ARGV[7], ARGV[8]
local claimed, taken, offset = {}, 0, 0
local page = math.max(2 * want, 32)
while taken < want and offset < scan do
  local due = redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'WITHSCORES', 'LIMIT', offset, page)
  for i = 1, #due, 2 do
    local id = due[i]
    local marker = prefix .. id
    if redis.call('EXISTS', marker) == 0 then
      redis.call('PSETEX', marker, ttl, '1')
      claimed[#claimed + 1] = id
      claimed[#claimed + 1] = due[i + 1]
      claimed[#claimed + 1] = redis.call('GET', job_prefix .. id)
      claimed[#claimed + 1] = redis.call('INCR', try_prefix .. id)
      redis.call('EXPIRE', try_prefix .. id, try_ttl)
      taken = taken + 1
      if taken >= want then break end
    end
  end
  if #due < 2 * page then break end
  offset = offset + page
end
local later = redis.call('ZRANGEBYSCORE', queue, '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
return {claimed, later[2] or false}
"""
#: How long start-up waits for the wake-up subscription before it polls without it.
SUBSCRIBE_TIMEOUT_S = 5.0
#: Pause before re-subscribing after the wake-up connection failed.
RESUBSCRIBE_DELAY_S = 1.0


class FastPollWorker(ResilientWorker):
    """ResilientWorker, woken by freed slots and wake-up messages; `poll_delay` is a fallback."""

    def __init__(self, *args: Any, slots: ModelSlots | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.allow_abort_jobs:  # run_job's start would expect a 4th reply (worker.job_start)
            raise ValueError("arq's allow_abort_jobs is not supported: promptq cancels jobs itself")
        #: The jobs' model slots: jobs past theirs (finishing) don't count against max_jobs.
        self.slots = slots
        if slots is not None:
            slots.on_release = self.wake  # a finishing job makes room for another
            self.sem = asyncio.BoundedSemaphore(self.max_jobs + slots.size)
        self.wake_channel = wake_channel(self.queue_name)
        self._wake = asyncio.Event()
        self._claim: AsyncScript | None = None
        #: From the last claim: the due time (Unix ms) of the next deferred job, if any, and
        #: whether that answer is still unused (the loop consumes it once).
        self._next_due_ms: float | None = None
        self._next_due_known = False
        self._finishes: BatchedFinish | None = None
        #: Jobs whose run here put them back on the queue and is ending. A claim that takes
        #: such a job again starts its next run after that one.
        self._requeued: set[str] = set()

    def wake(self) -> None:
        """Make the main loop poll now."""
        self._wake.set()

    async def main(self) -> None:
        """Start up as arq does, then poll whenever woken (or every `poll_delay_s`)."""
        await self._connect()  # retries for as long as Redis is away
        answer_job_starts(self.pool)  # run_job's first round trip was the claim's
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
            if self.allow_pick_jobs and self._free_jobs() > 0:
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

    async def _poll_once(self) -> None:
        """Claim jobs for the free slots, clean up finished tasks, heartbeat (arq's order)."""
        slots = self._free_jobs()
        if self.allow_pick_jobs and slots > 0:
            if self.burst and self.max_burst_jobs >= 0:
                slots = min(slots, self.max_burst_jobs - self._jobs_started())
                if slots < 1:
                    return
            await self._claim_and_start(slots)
        self._clean_up_tasks()
        await self.heart_beat()

    def _clean_up_tasks(self) -> None:
        """Forget the ended job tasks, all in one pass, and re-raise what escaped arq's run_job
        (as arq does), except a Redis error: a job that ended while Redis was away could not
        write arq's end of it (the reconciler tidies that up), and that is no reason to back
        off now that Redis answers again."""
        escaped: list[BaseException] = []
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                if not task.cancelled() and (exc := task.exception()) is not None:
                    escaped.append(exc)
        lost = [exc for exc in escaped if isinstance(exc, REDIS_DOWN)]
        if lost:
            logger.warning(
                "%d job(s) ended while Redis was away and could not record their end there "
                "(%r); their results are in SQL, and the reconciler tidies up Redis",
                len(lost),
                lost[0],
            )
        for exc in escaped:
            if not isinstance(exc, REDIS_DOWN):
                raise exc

    def _free_jobs(self) -> int:
        """How many more jobs to take: max_jobs, plus the finishing ones (at most one per model
        slot: they are about to end), less the jobs held."""
        finishing = 0 if self.slots is None else min(self.slots.finishing, self.slots.size)
        return self.max_jobs + finishing - self.job_counter

    async def _claim_and_start(self, slots: int) -> None:
        """Take up to `slots` due jobs in one round trip and start each as arq would."""
        if self._claim is None:
            self._claim = self.pool.register_script(CLAIM_SCRIPT)
        claimed, next_due = await self._claim(
            keys=[self.queue_name],
            args=[
                timestamp_ms(),
                slots,
                in_progress_key_prefix,
                int(self.in_progress_timeout_s * 1000),
                CLAIM_SCAN_LIMIT,
                job_key_prefix,
                retry_key_prefix,
                ARQ_TRY_TTL_S,
            ],
        )
        self._next_due_ms = None if next_due is None else float(next_due)
        self._next_due_known = True
        for i in range(0, len(claimed), 4):
            job_id, score = claimed[i].decode(), int(float(claimed[i + 1]))
            running = self.tasks.get(job_id)
            if running is not None and running.done():
                running = None
            if running is not None and job_id not in self._requeued:
                # Already running here (its lease lapsed and the reconciler freed it): the
                # marker we just set is this run's; don't start a second one.
                continue
            await self.sem.acquire()  # free: see _free_jobs
            self.job_counter += 1
            # Job, try count, EXPIRE's reply: what run_job's start transaction would get.
            with started([claimed[i + 2], claimed[i + 3], True]):
                run = self.run_job(job_id, score)
                # A run that put the job back (a retry due at once) may not have ended yet:
                # this one follows it. (Skipped, it would leave the marker just set, and the
                # job would wait for the reconciler to clear it.)
                task = self.loop.create_task(run if running is None else _after(running, run))
            self._requeued.discard(job_id)
            task.add_done_callback(functools.partial(self._run_ended, job_id))
            self.tasks[job_id] = task

    async def _seconds_until_next_due(self) -> float:
        """Seconds until the earliest job that is not yet due will be; inf if there is none."""
        now_ms = timestamp_ms()
        if self._next_due_known:  # the claim just told us
            self._next_due_known = False
            if self._next_due_ms is None:
                return math.inf
            return max(0.0, (self._next_due_ms - now_ms) / 1000 + DUE_MARGIN_S)
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
        outage = OutageLog(logger, "wake-up subscription")
        while self._pool is not None:  # arq's close() drops the pool
            try:
                async with self._pool.pubsub() as pubsub:
                    await pubsub.subscribe(self.wake_channel)
                    async for message in pubsub.listen():
                        if message["type"] == "subscribe":
                            subscribed.set()
                            outage.ok()
                        self._wake.set()  # on (re)subscribing too: we may have missed some
            except Exception as exc:  # never let the listener die: without it we only poll
                outage.failed(exc, "polling until it is back")
                await asyncio.sleep(RESUBSCRIBE_DELAY_S)

    def _run_ended(self, job_id: str, _: asyncio.Task[Any]) -> None:
        self._requeued.discard(job_id)
        self._release_sem_dec_counter_on_complete()

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._wake.set()  # a slot is free: refill it now

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
        """arq's finish; a job put back on the queue also wakes the other workers.

        The common end, a finished job with no result to keep, is written together with the
        other jobs that end at the same time (worker.finishes).
        """
        if finish and not result_data and keep_in_progress is None:
            if self._finishes is None:
                self._finishes = BatchedFinish(self.pool, self.queue_name)
            await self._finishes.finish(job_id)
            return
        if not finish:  # from now until its run_job task ends (_run_ended)
            self._requeued.add(job_id)
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


async def _after(previous: asyncio.Task[Any], run: Coroutine[Any, Any, Any]) -> None:
    """Run `run` once `previous` (the job's last run here, ending) is over."""
    try:
        await asyncio.wait([previous])
    except BaseException:
        run.close()  # cancelled while waiting: never started
        raise
    await run
