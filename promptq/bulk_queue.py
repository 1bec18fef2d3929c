"""Enqueue many jobs at once: arq's job format, written through Redis pipelines.

`ArqRedis.enqueue_job` costs a WATCH/MULTI transaction (four round trips) per job. For a batch
of 100k that is most of the ingest time, so this writes exactly what `enqueue_job` writes (the
serialized job under `arq:job:<id>` with its expiry, and the id in the queue's sorted set,
scored by its due time in Unix ms) with one small Lua script per job, many per round trip. The
script keeps arq's rule, atomically: a job whose job key or result key exists is left alone.
The job id is arq's `_job_id`, as in `QueueClient.enqueue`, so an enqueue is idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms, to_ms
from redis.exceptions import RedisError

from promptq.errors import ServiceUnavailable
from promptq.queue import JOB_EXPIRES, RUN_JOB, QueueClient, serialize

logger = logging.getLogger(__name__)

#: Jobs per pipeline round trip.
PIPELINE_JOBS = 1000

# KEYS: job key, result key, queue. ARGV: serialized job, expiry ms, score, job id.
_ENQUEUE_LUA = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return 1
"""


async def enqueue_many(queue: QueueClient, job_ids: Iterable[str]) -> int:
    """Enqueue every job id now, in order; returns how many were newly queued.

    Workers are woken after each pipeline, so they start on the first jobs while the rest are
    still being written. Raises ServiceUnavailable if Redis fails part-way: the jobs not yet
    queued stay `queued` in SQL, and the workers' reconciler enqueues them.
    """
    expires_ms = str(to_ms(JOB_EXPIRES))
    queued = 0
    chunk: list[str] = []
    try:
        script = await queue.redis.script_load(_ENQUEUE_LUA)
        for job_id in job_ids:
            chunk.append(job_id)
            if len(chunk) >= PIPELINE_JOBS:
                queued += await _pipeline(queue, script, chunk, expires_ms)
                chunk = []
        if chunk:
            queued += await _pipeline(queue, script, chunk, expires_ms)
    except (RedisError, OSError) as exc:
        raise ServiceUnavailable(
            f"Redis failed after {queued} job(s) were queued; the rest are saved and the "
            "reconciler will queue them"
        ) from exc
    return queued


async def _pipeline(queue: QueueClient, sha: str, job_ids: list[str], expires_ms: str) -> int:
    now_ms = timestamp_ms()
    async with queue.redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            data = serialize_job(RUN_JOB, (job_id,), {}, None, now_ms, serializer=serialize)
            keys = (job_key_prefix + job_id, result_key_prefix + job_id, queue.queue_name)
            pipe.evalsha(sha, 3, *keys, data, expires_ms, now_ms, job_id)  # type: ignore[arg-type]
        results = await pipe.execute()
    if not await queue.wake_workers():
        logger.warning("%d job(s) queued; idle workers were not woken (next poll)", len(job_ids))
    return sum(int(r) for r in results)
