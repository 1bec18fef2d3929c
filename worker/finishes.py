"""arq's end-of-job bookkeeping for many jobs in one Redis transaction.

When a job ends, arq deletes its keys (the job, its retry counter, its in-progress marker) and
takes it off the queue, in one MULTI/EXEC per job. At hundreds of jobs a second those round
trips are a good part of a worker's CPU. `BatchedFinish.finish` queues the job's ids and
returns a future; a task started on demand writes everything queued since its last write in one
MULTI/EXEC (the same commands as arq's, so each job's keys still go together, atomically) and
resolves the futures. A lone job waits one event-loop turn; under load, jobs that end together
share a round trip. A Redis error fails every future of that write, as arq's own would.
"""

from __future__ import annotations

import asyncio

from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from redis.asyncio import Redis


class BatchedFinish:
    """Finishes jobs (arq's `finish_job` with finish=True and no result), many per round trip."""

    def __init__(self, redis: Redis, queue_name: str) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self._pending: list[tuple[str, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    def finish(self, job_id: str) -> asyncio.Future[None]:
        """Queue the job's end; the future resolves once Redis has it."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((job_id, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="promptq-finish-jobs")
        return future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self._write([job_id for job_id, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def _write(self, job_ids: list[str]) -> None:
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
