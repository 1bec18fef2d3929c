"""Cancelling jobs and batches.

A queued or retrying job is cancelled by one conditional UPDATE; a worker that picks it up
later finds it terminal and drops the delivery, so it never reaches the model. A running job
gets `cancel_requested_at` and a message on `<queue>:cancel`; the worker running it aborts the
attempt, records it as `cancelled`, and the job as `cancelled` (worker.cancel). If the message
is lost, the worker's lease renewal notices `cancel_requested_at` within lease_s/3. A job
flagged so is never sent back to wait: if its attempt stops anyway (a transient error, a
worker stopping or lost), the store cancels it instead (`JobStore.finish_attempt`, `claim`).
Finished jobs keep their results: cancelling one is a 409.

A batch is cancelled here whichever route asks (`/api/batches/{id}/cancel`, or the OpenAI Batch
API's `/v1/batches/{id}/cancel` and its expiry, through promptq.openai_batch), so this is also
where an OpenAI Batch API batch gets OpenAI's record of it: `cancelling_at` now, and
`cancelled_at` only when its last request has stopped (`cancelling` → `cancelled`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from redis.exceptions import RedisError
from sqlalchemy import func, select, update

from promptq import clock, events
from promptq.batch_schemas import BatchOut
from promptq.batches import OPEN_STATUSES, BatchService
from promptq.errors import NotCancellable, NotFound
from promptq.models import Batch, BatchStatus, Job, JobStatus
from promptq.service import JobService
from promptq.store import CLAIMABLE, IDS_PER_STATEMENT, cancelled_values

logger = logging.getLogger(__name__)

#: Times to look again when a job changes status between our reads and writes.
_RACE_TRIES = 5


def cancel_channel(queue_name: str) -> str:
    """The pub/sub channel that carries the ids of running jobs to abort."""
    return f"{queue_name}:cancel"


class Canceller:
    """Cancels jobs and batches through the store, and tells workers over Redis."""

    def __init__(self, service: JobService) -> None:
        self.service = service
        self.sessionmaker = service.store.sessionmaker

    async def cancel_job(self, job_id: str, *, owned_by: str | None) -> Job:
        """Cancel one job; the job as it is now (`cancelled`, or `running` while it aborts).

        NotFound if it does not exist (or is not theirs); NotCancellable if it has finished.
        """
        store = self.service.store
        if await store.get_job(job_id, owned_by=owned_by) is None:
            raise NotFound(f"no job with id {job_id}")
        for _ in range(_RACE_TRIES):
            if await self._cancel_waiting([job_id]):
                await self._announce([job_id])
                break
            if running := await self._request_running([job_id]):
                await self.notify_workers(running)
                break
            job = await store.get_job(job_id)
            if job is None:
                raise NotFound(f"no job with id {job_id}")
            if JobStatus(job.status).is_terminal:
                raise NotCancellable(
                    f"job {job_id} has already {_ended(job.status)}; only queued, retrying or "
                    "running jobs can be cancelled"
                )
        job = await store.get_job(job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id}")
        return job

    async def cancel_batch(self, batch_id: str, *, owned_by: str | None) -> BatchOut:
        """Cancel every unfinished job of a batch; finished ones keep their results.

        The batch is `cancelling` until its running jobs have stopped, then `cancelled`
        (an OpenAI Batch API batch once promptq.openai_batch has written its files).
        NotCancellable if the batch had already finished.
        """
        batches = BatchService(self.service)
        batch = await batches.get_row(batch_id, owned_by=owned_by)
        current = await batches.get(batch_id, owned_by=owned_by)  # settles a finished batch
        cancellable = _cancellable_statuses(batch)
        if current.status not in cancellable:
            raise NotCancellable(
                f"batch {batch_id} is already {current.status}; only a batch in progress can be "
                "cancelled"
            )
        now = clock.now()
        async with self.sessionmaker() as session, session.begin():
            await session.execute(
                update(Batch)
                .where(Batch.id == batch.id, Batch.status.in_(cancellable))
                .values(status=BatchStatus.CANCELLING, updated_at=now, **_cancel_stamps(batch, now))
            )
            # Flag every unfinished job first, so one that starts or stops in between is
            # still caught: by the status UPDATE below, or by its worker's lease renewal.
            await session.execute(
                update(Job)
                .where(Job.batch_id == batch.id, Job.status.not_in(_TERMINAL))
                .values(cancel_requested_at=func.coalesce(Job.cancel_requested_at, now))
            )
            await session.execute(
                update(Job)
                .where(Job.batch_id == batch.id, Job.status.in_(CLAIMABLE))
                .values(**cancelled_values(now))
            )
        async with self.sessionmaker() as session:
            rows = await session.execute(
                select(Job.id, Job.attempts).where(
                    Job.batch_id == batch.id, Job.status == JobStatus.RUNNING
                )
            )
            running = [(row.id, row.attempts) for row in rows]
        await self.notify_workers(running)
        logger.info("batch %s cancelled (%d running job(s) told to stop)", batch.id, len(running))
        return await batches.get(batch.id, owned_by=None)

    async def _cancel_waiting(self, job_ids: Sequence[str]) -> list[str]:
        """Cancel those of `job_ids` that are queued or retrying; the ids cancelled."""
        now = clock.now()
        async with self.sessionmaker() as session, session.begin():
            result = await session.execute(
                update(Job)
                .where(Job.id.in_(list(job_ids)), Job.status.in_(CLAIMABLE))
                .values(**cancelled_values(now), cancel_requested_at=now)
                .returning(Job.id)
            )
            return list(result.scalars())

    async def _request_running(self, job_ids: Sequence[str]) -> list[tuple[str, int]]:
        """Flag those of `job_ids` that are running; (id, attempt number) of those flagged."""
        now = clock.now()
        async with self.sessionmaker() as session, session.begin():
            result = await session.execute(
                update(Job)
                .where(Job.id.in_(list(job_ids)), Job.status == JobStatus.RUNNING)
                .values(cancel_requested_at=func.coalesce(Job.cancel_requested_at, now))
                .returning(Job.id, Job.attempts)
            )
            return [(row.id, row.attempts) for row in result]

    async def notify_workers(self, attempts: Sequence[tuple[str, int]]) -> None:
        """Tell the workers to abort these running attempts ((job id, attempt number)), with
        a `<job id>:<number>` message each; best effort: leases are the backup."""
        if not attempts:
            return
        queue = self.service.queue
        channel = cancel_channel(queue.queue_name)
        try:
            for start in range(0, len(attempts), IDS_PER_STATEMENT):
                async with queue.redis.pipeline(transaction=False) as pipe:
                    for job_id, number in attempts[start : start + IDS_PER_STATEMENT]:
                        pipe.publish(channel, f"{job_id}:{number}".encode())
                    await pipe.execute()
        except (RedisError, OSError) as exc:
            logger.warning("could not tell workers to cancel (%r); their leases will", exc)

    async def _announce(self, job_ids: Sequence[str]) -> None:
        queue = self.service.queue
        for job_id in job_ids:
            await events.publish(queue.redis, queue.queue_name, job_id, {"type": "status"})


_TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
#: The statuses in which an OpenAI Batch API batch may be cancelled (as OpenAI allows).
_OPENAI_CANCELLABLE = (BatchStatus.IN_PROGRESS,)


def _is_native(batch: Batch) -> bool:
    """True for a native batch; False for an OpenAI Batch API one (`api = "openai"`)."""
    return batch.api == "native"


def _cancellable_statuses(batch: Batch) -> Sequence[BatchStatus]:
    """The statuses from which the batch may be cancelled: an OpenAI Batch API batch only
    while `in_progress`, as `/v1/batches/{id}/cancel` says; it is then never cancelled
    while its output files are being written."""
    return OPEN_STATUSES if _is_native(batch) else _OPENAI_CANCELLABLE


def _cancel_stamps(batch: Batch, now: datetime) -> dict[str, datetime]:
    """The columns that record a cancel request, in the batch's own API's terms.

    A native batch stamps `cancelled_at` now. An OpenAI Batch API batch stamps `cancelling_at`
    now (promptq.openai_batch finalizes it as `cancelled`, stamping `cancelled_at`, because
    that is set), unless it is being stopped because it expired: that one records `expired_at`
    only, and ends `expired`.
    """
    if _is_native(batch):
        return {"cancelled_at": now}
    if batch.expired_at is not None:
        return {}
    return {"cancelling_at": now}


def _ended(status: str) -> str:
    return {"succeeded": "succeeded", "failed": "failed", "cancelled": "been cancelled"}.get(
        status, status
    )
