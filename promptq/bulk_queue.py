"""Enqueue many jobs at once: arq's job format, written through Redis pipelines.

`ArqRedis.enqueue_job` costs a WATCH/MULTI transaction (four round trips) per job. For a batch
of 100k that is most of the ingest time, so this writes exactly what `enqueue_job` writes (the
serialized job under `arq:job:<id>` with its expiry, and the id in the queue's sorted set,
scored by its due time in Unix ms) with one small Lua script call per PIPELINE_JOBS jobs. The
script keeps arq's rule for each job: a job whose job key or result key exists is left alone.
The job id is arq's `_job_id`, as in `QueueClient.enqueue`, so an enqueue is idempotent.
(The script builds the job keys from their prefixes, so it assumes a single Redis, not a
cluster; arq assumes the same.)
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

#: Jobs per script call (one round trip).
PIPELINE_JOBS = 1000

# KEYS[1]: the queue. ARGV: job key prefix, result key prefix, expiry ms, score, then
# (job id, serialized job) pairs. Returns how many jobs it queued.
_ENQUEUE_LUA = """
local queued = 0
for i = 5, #ARGV, 2 do
  local id = ARGV[i]
  local job_key = ARGV[1] .. id
  if redis.call('EXISTS', job_key, ARGV[2] .. id) == 0 then
    redis.call('SET', job_key, ARGV[i + 1], 'PX', ARGV[3])
    redis.call('ZADD', KEYS[1], ARGV[4], id)
    queued = queued + 1
  end
end
return queued
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
    args: list[str | bytes | int] = [job_key_prefix, result_key_prefix, expires_ms, now_ms]
    for job_id in job_ids:
        args.append(job_id)
        args.append(serialize_job(RUN_JOB, (job_id,), {}, None, now_ms, serializer=serialize))
    queued = int(await queue.redis.evalsha(sha, 1, queue.queue_name, *args))  # type: ignore[arg-type,misc]
    if not await queue.wake_workers():
        logger.warning("%d job(s) queued; idle workers were not woken (next poll)", len(job_ids))
    return queued
