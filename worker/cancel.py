"""Aborting a running attempt when its job is cancelled.

`POST /api/jobs/{id}/cancel` (or a batch cancel) flags a running job with `cancel_requested_at`
and publishes its id on `<queue>:cancel`. Every worker listens there; the one running the job
cancels the asyncio task of the attempt, but only while the attempt waits on the model (inside
`cancellable`), never while it writes its outcome. The job function then records the attempt
and the job as `cancelled` (worker.jobs). A message names the attempt (`<job id>:<number>`):
one that arrives just before its attempt reaches `cancellable` is kept for PENDING_S and
applied when it does.

If the message is lost (Redis blip, worker re-subscribing), the lease keeper's renewal asks the
database which held jobs have `cancel_requested_at` set (`check`), every lease_s/3.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from promptq.cancel import cancel_channel
from promptq.models import Job, JobStatus
from promptq.outage import OutageLog
from promptq.store import IDS_PER_STATEMENT, Claim
from worker.background import Background

logger = logging.getLogger(__name__)

#: Pause before re-subscribing after the cancel channel's connection failed.
RESUBSCRIBE_DELAY_S = 1.0
#: How long a request for an attempt not (yet) running here is kept.
PENDING_S = 30.0


class CancelWatcher(Background):
    """Knows which attempts of this worker may be aborted, and aborts them on request."""

    TASK_NAME = "promptq-cancel-listener"

    def __init__(
        self, redis: Redis, queue_name: str, sessionmaker: async_sessionmaker[AsyncSession]
    ) -> None:
        self.redis = redis
        self.channel = cancel_channel(queue_name)
        self.sessionmaker = sessionmaker
        #: job id -> (attempt number, the task running it), while it waits on the model.
        self._running: dict[str, tuple[int, asyncio.Task[object]]] = {}
        #: (job id, attempt number) of attempts this watcher cancelled.
        self._cancelled: set[tuple[str, int]] = set()
        #: (job id, attempt number) -> monotonic time, for requests that came early.
        self._pending: dict[tuple[str, int], float] = {}

    @contextmanager
    def cancellable(self, claim: Claim) -> Iterator[None]:
        """While inside, a cancel request for this job cancels the current task."""
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - always inside a task in a worker
            yield
            return
        self._running[claim.job_id] = (claim.number, task)
        if self._pending.pop((claim.job_id, claim.number), None) is not None:
            self.request(claim.job_id, claim.number)  # raises CancelledError at the next await
        try:
            yield
        finally:
            if self._running.get(claim.job_id, (None,))[0] == claim.number:
                del self._running[claim.job_id]

    def request(self, job_id: str, number: int | None = None) -> bool:
        """Abort the job's attempt (attempt `number`, if given) if it is running here; True if
        it was. A request for a numbered attempt not running here is kept for PENDING_S."""
        entry = self._running.get(job_id)
        if entry is None or (number is not None and entry[0] != number):
            if number is not None:
                self._keep(job_id, number)
            return False
        del self._running[job_id]
        number, task = entry
        self._cancelled.add((job_id, number))
        task.cancel(msg="promptq: job cancelled")
        logger.info("job %s attempt %d: cancel requested, aborting", job_id, number)
        return True

    def _keep(self, job_id: str, number: int) -> None:
        now = time.monotonic()
        if len(self._pending) > 1000:
            self._pending = {k: t for k, t in self._pending.items() if now - t < PENDING_S}
        self._pending[(job_id, number)] = now

    def consume(self, claim: Claim) -> bool:
        """True if this watcher cancelled the attempt and nothing else did (the current task's
        cancellation is then withdrawn); False for a cancel by someone else (shutdown)."""
        try:
            self._cancelled.remove((claim.job_id, claim.number))
        except KeyError:
            return False
        task = asyncio.current_task()
        return task is not None and task.uncancel() == 0

    async def check(self, held: Mapping[str, int]) -> None:
        """Abort held attempts whose job has `cancel_requested_at` set (lost messages)."""
        ids = [job_id for job_id in held if job_id in self._running]
        for start in range(0, len(ids), IDS_PER_STATEMENT):
            query = select(Job.id).where(
                Job.id.in_(ids[start : start + IDS_PER_STATEMENT]),
                Job.status == JobStatus.RUNNING,
                Job.cancel_requested_at.is_not(None),
            )
            async with self.sessionmaker() as session:
                for job_id in (await session.execute(query)).scalars():
                    self.request(job_id)

    def _on_message(self, data: bytes | str) -> None:
        text = data.decode() if isinstance(data, bytes) else str(data)
        job_id, _, number = text.partition(":")
        self.request(job_id, int(number) if number.isdigit() else None)

    async def _run(self) -> None:
        outage = OutageLog(logger, "cancel subscription")
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    outage.ok()
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self._on_message(message["data"])
            except Exception as exc:  # never let the listener die
                outage.failed(exc, "re-subscribing; leases are the fallback meanwhile")
                await asyncio.sleep(RESUBSCRIBE_DELAY_S)
