"""arq's end-of-job bookkeeping for many jobs in one Redis transaction.

When a job ends, arq deletes its keys (the job, its retry counter, its in-progress marker) and
takes it off the queue, in one MULTI/EXEC per job. At hundreds of jobs a second those round
trips are a good part of a worker's CPU. `BatchedFinish.finish` queues the job's id in a
promptq.group_commit.GroupCommit: everything queued since the last write goes in one
MULTI/EXEC (the same commands as arq's, so each job's keys still go together, atomically). A
lone job waits one event-loop turn; under load, jobs that end together share a round trip. A
Redis error fails every job of that write, as arq's own would.
"""

from __future__ import annotations

from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from redis.asyncio import Redis

from promptq.group_commit import GroupCommit, Settled


class BatchedFinish:
    """Finishes jobs (arq's `finish_job` with finish=True and no result), many per round trip."""

    def __init__(self, redis: Redis, queue_name: str) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self._writes: GroupCommit[str] = GroupCommit(self._write)

    @property
    def transactions(self) -> int:
        """MULTI/EXEC transactions written so far."""
        return self._writes.transactions

    async def finish(self, job_id: str) -> None:
        """End the job in Redis, in a transaction shared with the jobs that end with it."""
        await self._writes.run(job_id)

    async def _write(self, job_ids: list[str]) -> list[Settled]:
        async with self.redis.pipeline(transaction=True) as tr:
            for job_id in job_ids:
                tr.zrem(abort_jobs_ss, job_id)
                tr.zrem(self.queue_name, job_id)
                tr.delete(
                    in_progress_key_prefix + job_id,
                    retry_key_prefix + job_id,
                    job_key_prefix + job_id,
                )
            await tr.execute()
        return [(True, None)] * len(job_ids)
