"""The reconciler: SQL is the truth, so every few seconds Redis is made to agree with it.

Each pass looks at
* running jobs whose lease ran out (their worker died): arq's stale in-progress marker is
  deleted and the job re-enqueued if Redis lost it, so another worker takes it over now
  instead of after arq's in-progress TTL (the job timeout + 10 s);
* queued/retrying jobs missing from Redis (a restart, FLUSHALL): they are enqueued again;
* queued/retrying jobs that Redis holds behind an in-progress marker although nothing runs
  them (a worker died between arq's pick-up and our claim): the marker is deleted;
* any of these whose arq due time lies well past when SQL says it is due (two workers'
  `Retry` on one job add up their delays in arq's score), or, for an interactive job that is
  due, past its priority's place ahead of bulk work (its worker stopped before it moved the
  job back there after a retry's backoff, worker.ahead): the due time is moved back.

It also marks the native batches whose jobs have all ended completed (or cancelled), so that
the `batches` table is right for readers of plain SQL (promptq.batches.settle_finished).

It runs as a background task of every worker, not as an arq cron job: a cron job waits in the
queue behind the whole backlog for a free slot, which is when it is needed most. A Redis lock
lets one worker per interval do the pass.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from promptq import clock
from promptq.batches import settle_finished
from promptq.outage import OutageLog
from promptq.queue import QueueClient, priority_due_ms
from promptq.store import JobStore

logger = logging.getLogger(__name__)

#: A job this fresh may be between its INSERT and its enqueue, or between arq's pick-up and
#: our claim; leave it alone. (Acting early would be harmless, only noisy: an enqueue of a
#: queued job is a no-op, and a second start of a job is refused by the claim.)
GRACE = timedelta(seconds=5)
#: Jobs examined per pass; a backlog is scanned over successive passes.
BATCH_SIZE = 1000
#: arq's in-progress marker of a job being picked up right now is younger than this; only an
#: older marker of a job SQL says nobody runs is stale.
MARKER_GRACE = timedelta(seconds=2)
#: A job whose arq due time is this much later than SQL's is brought forward.
LATE_BY_MS = 2000.0
#: The Redis lock (under the queue name) that lets one worker per interval reconcile.
LOCK_NAME = "reconciler-lock"


class Reconciler:
    """Makes Redis agree with SQL; keeps its place in the scan of waiting jobs between passes."""

    def __init__(
        self,
        store: JobStore,
        queue: QueueClient,
        *,
        marker_ttl_s: float,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self.store = store
        self.queue = queue
        #: The TTL arq gives its in-progress markers: time left on one tells its age.
        self.marker_ttl_s = marker_ttl_s
        self.batch_size = batch_size
        #: The last waiting job id examined; None starts the scan from the oldest job.
        self.cursor: str | None = None

    async def run_once(self) -> int:
        """One pass. Returns how many jobs it re-enqueued or unblocked."""
        if settled := await settle_finished(self.store.sessionmaker):
            logger.debug("%d batch(es) finished", settled)
        now = clock.now()
        orphans = await self.store.expired_leases(now=now, limit=self.batch_size)
        waiting = await self.store.waiting_jobs(
            older_than=now - GRACE, after_id=self.cursor, limit=self.batch_size
        )
        self.cursor = waiting[-1][0] if len(waiting) == self.batch_size else None
        due_at = {job_id: due for job_id, due, _ in waiting}
        states = await self.queue.states([*orphans, *due_at])

        # A marker is stale if it is older than MARKER_GRACE: younger, a worker may be between
        # arq's pick-up and our claim, and deleting it would start the job a second time.
        stale_below_s = self.marker_ttl_s - MARKER_GRACE.total_seconds()
        fenced = [
            job_id
            for job_id, state in states.items()
            if state.marker_ttl_s is not None and state.marker_ttl_s <= stale_below_s
        ]
        await self.queue.clear_in_progress(fenced)
        lost = [job_id for job_id, state in states.items() if not state.queued]
        priorities = {job_id: priority for job_id, _, priority in waiting if priority > 0}
        if orphans_lost := [job_id for job_id in lost if job_id not in due_at]:
            priorities |= await self.store.priorities(orphans_lost)
        for job_id in lost:
            due = due_at.get(job_id)
            await self.queue.enqueue(
                job_id,
                defer_s=(due - now).total_seconds() if due else 0,
                priority=priorities.get(job_id, 0),  # interactive work stays ahead of bulk
            )
        late = {}
        for job_id, state in states.items():
            due = due_at.get(job_id)
            if due is None or due <= now:
                # Due now; an interactive job (one that waited out a retry's backoff on the
                # queue, say) goes ahead of bulk work.
                due_ms = priority_due_ms(priorities.get(job_id, 0), now)
            else:
                due_ms = due.timestamp() * 1000
            if state.due_at_ms is not None and state.due_at_ms > due_ms + LATE_BY_MS:
                late[job_id] = due_ms
        await self.queue.reschedule(late)

        acted = len(set(fenced) | set(lost) | set(late))
        if acted:
            logger.warning(
                "reconciler: re-enqueued %d job(s) Redis had lost; unblocked %d held by a stale "
                "in-progress marker and brought forward %d (%d running job(s) had lost their "
                "worker)",
                len(lost),
                len(fenced),
                len(late),
                len(orphans),
            )
        return acted

    async def run_forever(self, *, interval_s: float, owner: str) -> None:
        """A pass every interval_s on whichever worker takes the lock; errors are logged."""
        outage = OutageLog(logger, "reconciler pass")
        while True:
            try:
                if await self.queue.try_lock(LOCK_NAME, owner=owner, ttl_s=interval_s * 0.9):
                    await self.run_once()
                outage.ok()
            except Exception as exc:  # Redis or the database is away; try again next interval
                outage.failed(exc, "trying again next interval")
            await asyncio.sleep(interval_s)
