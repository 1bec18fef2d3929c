"""The queue client: puts job ids on the arq queue in Redis. JSON only, never pickle."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.exceptions import RedisError

from promptq import clock
from promptq.errors import ServiceUnavailable
from promptq.settings import Settings

logger = logging.getLogger(__name__)

#: The arq function every promptq job runs through.
RUN_JOB = "run_job"
#: arq drops a job whose key outlives this; the reconciler re-enqueues from SQL anyway.
JOB_EXPIRES = timedelta(days=7)
JOB_EXPIRES_MS = round(JOB_EXPIRES.total_seconds() * 1000)
#: KEYS: the job's key, its result key, the queue. ARGV: the serialized job, its key's TTL
#: (ms), the job id, its score (due time, Unix ms), the wake-up channel. Returns 1 if queued,
#: 0 if the job (or its result) is already in Redis.
ENQUEUE_SCRIPT = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('PSETEX', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
redis.call('PUBLISH', ARGV[5], '')
return 1
"""
#: KEYS: the queue. ARGV: now (Unix ms), the wake-up channel, then pairs of job id and score.
#: Gives each job that waits in the queue for a later time (a deferred retry) its new score
#: (due now) and publishes one wake-up if any moved. Returns per job: 1 moved, 0 not deferred
#: (due or running already), -1 not in the queue.
WAKE_SCRIPT = """
local out, moved = {}, false
for i = 3, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if not score then
    out[#out + 1] = -1
  elseif tonumber(score) > tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[i + 1], ARGV[i])
    out[#out + 1], moved = 1, true
  else
    out[#out + 1] = 0
  end
end
if moved then redis.call('PUBLISH', ARGV[2], '') end
return out
"""
#: `move_ahead` treats a job due within this long as due.
MOVE_AHEAD_SLACK_S = 0.25
#: Jobs whose Redis state one call of the states script looks up.
STATES_PER_CALL = 1000
#: For each job id (ARGV[4:]): does arq's job key exist, the PTTL of its in-progress marker,
#: and its score in the queue (nil if absent). ARGV[1..3]: queue, job and marker key prefixes.
STATES_SCRIPT = """
local out = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  out[#out + 1] = redis.call('EXISTS', ARGV[2] .. id)
  out[#out + 1] = redis.call('PTTL', ARGV[3] .. id)
  out[#out + 1] = redis.call('ZSCORE', ARGV[1], id)
end
return out
"""


def wake_channel(queue_name: str) -> str:
    """The pub/sub channel on which an enqueue wakes idle workers of `queue_name` at once."""
    return f"{queue_name}:wake"


def serialize(value: dict[str, Any]) -> bytes:
    """arq job serializer: JSON via orjson."""
    return orjson.dumps(value)


def deserialize(data: bytes) -> dict[str, Any]:
    """arq job deserializer: JSON via orjson."""
    value: dict[str, Any] = orjson.loads(data)
    return value


def redis_settings(settings: Settings) -> RedisSettings:
    """arq connection settings from our Settings."""
    return RedisSettings.from_dsn(settings.redis_url)


class QueueClient:
    """Enqueues job ids. The job id doubles as arq's `_job_id`, so a re-enqueue is a no-op."""

    def __init__(self, redis: ArqRedis, queue_name: str) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self.wake_channel = wake_channel(queue_name)
        self._states_script = redis.register_script(STATES_SCRIPT)
        self._enqueue_script = redis.register_script(ENQUEUE_SCRIPT)
        self._wake_script = redis.register_script(WAKE_SCRIPT)
        self._release_script = redis.register_script(RELEASE_SCRIPT)

    @classmethod
    async def connect(cls, settings: Settings) -> QueueClient:
        """Open a connection pool to the configured Redis."""
        try:
            pool = await create_pool(
                redis_settings(settings),
                job_serializer=serialize,
                job_deserializer=deserialize,
                default_queue_name=settings.queue_name,
            )
        except (RedisError, OSError) as exc:
            raise redis_unreachable(settings) from exc
        return cls(pool, settings.queue_name)

    async def close(self) -> None:
        """Close the pool."""
        await self.redis.aclose()

    async def ping(self) -> None:
        """Raise ServiceUnavailable unless Redis answers."""
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable("Redis is unreachable") from exc

    async def enqueue(self, job_id: str, *, defer_s: float = 0.0, priority: int = 0) -> bool:
        """Put a job on the queue and wake idle workers; False if it is already there.

        One script (`ENQUEUE_SCRIPT`) does what arq's `enqueue_job` does in a WATCH/MULTI
        transaction of three round trips (refuse a job whose key or result exists, store the
        job, add it to the queue) and publishes the wake-up, atomically, in one round trip.
        The job is stored exactly as arq stores it. A deferred job wakes workers too, so that
        they re-compute when the next job falls due.

        arq hands out due jobs in score order, and the score is the due time. A job with a
        priority (and no deferral) gets a score `priority` days in the past (see
        PRIORITY_STEP), so it goes ahead of every bulk job, however long the backlog.
        """
        enqueue_time_ms = timestamp_ms()
        if defer_s > 0:
            score = enqueue_time_ms + round(defer_s * 1000)
        elif priority > 0:
            score = round(priority_due_ms(priority, clock.now()))
        else:
            score = enqueue_time_ms
        payload = serialize_job(RUN_JOB, (job_id,), {}, None, enqueue_time_ms, serializer=serialize)
        try:
            added = await self._enqueue_script(
                keys=[job_key_prefix + job_id, result_key_prefix + job_id, self.queue_name],
                args=[payload, JOB_EXPIRES_MS, job_id, score, self.wake_channel],
            )
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable(
                "Redis is unreachable; the job is saved and will be queued"
            ) from exc
        return bool(added)

    async def wake_workers(self) -> bool:
        """Publish a wake-up to this queue's workers; False if Redis did not take it (a hint)."""
        try:
            await self.redis.publish(self.wake_channel, b"")
        except (RedisError, OSError):
            return False
        return True

    async def missing(self, job_ids: Sequence[str]) -> list[str]:
        """The ids among `job_ids` that have no arq job in Redis."""
        states = await self.states(job_ids)
        return [job_id for job_id in job_ids if not states[job_id].queued]

    async def states(self, job_ids: Sequence[str]) -> dict[str, RedisState]:
        """What Redis holds for each job: its arq job, and arq's in-progress marker.

        One server-side script per STATES_PER_CALL jobs instead of three commands per job:
        the reconciler asks this about a whole backlog every pass.
        """
        states: dict[str, RedisState] = {}
        for start in range(0, len(job_ids), STATES_PER_CALL):
            chunk = list(job_ids[start : start + STATES_PER_CALL])
            found = await self._states_script(
                args=[self.queue_name, job_key_prefix, in_progress_key_prefix, *chunk]
            )
            for i, job_id in enumerate(chunk):
                exists, ttl_ms, score_ms = found[3 * i : 3 * i + 3]
                # PTTL: -2 means no marker, -1 a marker without expiry.
                marker_ttl_s = (
                    None if ttl_ms == -2 else (float("inf") if ttl_ms < 0 else ttl_ms / 1000)
                )
                states[job_id] = RedisState(
                    queued=bool(exists),
                    marker_ttl_s=marker_ttl_s,
                    due_at_ms=None if score_ms is None else float(score_ms),
                )
        return states

    async def reschedule(self, due_at_ms: Mapping[str, float]) -> None:
        """Move queued jobs' arq due times (their score in the queue) to the given ones."""
        if due_at_ms:
            await self.redis.zadd(self.queue_name, dict(due_at_ms), xx=True)
            await self.wake_workers()  # a job brought forward may be due now

    async def move_ahead(self, job_id: str, priority: int) -> None:
        """Give a queued job that is due its priority's score again (ahead of bulk work; see
        enqueue). A job deferred again meanwhile (retried once more) keeps its due time; one
        due within MOVE_AHEAD_SLACK_S counts as due (arq re-scores a retry a moment after the
        worker sets its timer)."""
        now = clock.now()
        score = await self.redis.zscore(self.queue_name, job_id)
        due_by_ms = (now.timestamp() + MOVE_AHEAD_SLACK_S) * 1000
        if score is not None and score <= due_by_ms:
            await self.reschedule({job_id: priority_due_ms(priority, now)})

    async def wake(self, priorities: Mapping[str, int]) -> dict[str, int]:
        """Make deferred jobs due now, each at its priority's score: {job id: priority}. Per
        job: 1 moved, 0 not deferred (due or running already), -1 not in the queue."""
        if not priorities:
            return {}
        now = clock.now()
        args: list[str | float] = [now.timestamp() * 1000, self.wake_channel]
        for job_id, priority in priorities.items():
            args += [job_id, priority_due_ms(priority, now)]
        found = await self._wake_script(keys=[self.queue_name], args=args)
        return dict(zip(priorities, (int(code) for code in found), strict=True))

    async def clear_in_progress(self, job_ids: Sequence[str]) -> None:
        """Delete arq's in-progress markers, so the jobs can be picked up again at once."""
        if job_ids:
            await self.redis.delete(*(in_progress_key_prefix + job_id for job_id in job_ids))
            await self.wake_workers()  # the unblocked jobs can start now

    @asynccontextmanager
    async def exclusive(self, name: str, *, hold_s: float, wait_s: float) -> AsyncIterator[bool]:
        """Hold `<queue>:<name>` while the block runs, waiting up to `wait_s` for whoever
        holds it (a holder that died lets go after `hold_s`). Yields whether it is held: with
        Redis away, or still taken after `wait_s`, the block runs anyway, unserialized."""
        key, token = f"{self.queue_name}:{name}", uuid.uuid4().hex
        deadline, pause_s = time.monotonic() + wait_s, LOCK_POLL_S[0]
        held = False
        try:
            while not (
                held := bool(await self.redis.set(key, token, nx=True, px=round(hold_s * 1000)))
            ):
                if time.monotonic() >= deadline:
                    logger.debug("lock %s still taken after %g s; going on without it", key, wait_s)
                    break
                await asyncio.sleep(pause_s)
                pause_s = min(pause_s * 1.5, LOCK_POLL_S[1])
        except (RedisError, OSError):
            held = False
        try:
            yield held
        finally:
            if held:
                with suppress(RedisError, OSError):
                    await self._release_script(keys=[key], args=[token])

    async def try_lock(self, name: str, *, owner: str, ttl_s: float) -> bool:
        """Take `<queue>:<name>` for ttl_s unless someone holds it; True if we took it."""
        key = f"{self.queue_name}:{name}"
        taken = await self.redis.set(key, owner, nx=True, px=max(1, round(ttl_s * 1000)))
        return bool(taken)


#: Delete KEYS[1] if it still holds ARGV[1] (the lock is still ours).
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
#: How long `exclusive` waits between tries: from the first, growing to the second.
LOCK_POLL_S = (0.002, 0.05)


#: How far back one unit of priority moves a job's score. A bulk job waits at most
#: JOB_EXPIRES (7 days) in Redis, so Priority.INTERACTIVE (10 days back) beats any of them.
PRIORITY_STEP = timedelta(days=1)


def priority_due_ms(priority: int, now: datetime) -> float:
    """The arq score of a job of this priority due at `now` (Unix ms): `now` for bulk work,
    earlier for interactive work (see `QueueClient.enqueue`)."""
    return (now - PRIORITY_STEP * priority).timestamp() * 1000


@dataclass(frozen=True, slots=True)
class RedisState:
    """A job as Redis sees it."""

    #: arq holds the job (its key exists; it waits in, or runs from, the queue).
    queued: bool
    #: Time left on arq's in-progress marker, None without one. While the marker is set, no
    #: worker picks the job up; arq sets it for the job timeout + 10 s.
    marker_ttl_s: float | None
    #: When arq will hand the job out (its score in the queue, Unix ms), None if not queued.
    due_at_ms: float | None


def redis_unreachable(settings: Settings) -> ServiceUnavailable:
    """The error for a Redis that does not answer, saying where it was looked for."""
    where = redis_settings(settings)
    return ServiceUnavailable(
        f"Redis at {where.host}:{where.port} is unreachable; start it or set PROMPTQ_REDIS_URL"
    )
