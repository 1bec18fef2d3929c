"""The reconciler: SQL is the truth, so any waiting job missing from Redis is enqueued again."""

from __future__ import annotations

import logging
from datetime import timedelta

from promptq import clock
from worker.context import WorkerContext

logger = logging.getLogger(__name__)

#: A job this fresh may be between its INSERT and its enqueue; leave it alone.
GRACE = timedelta(seconds=10)
#: Jobs examined per pass; a backlog is worked off over successive passes.
BATCH_SIZE = 1000


async def reconcile(ctx: WorkerContext) -> int:
    """Re-enqueue queued/retrying jobs that Redis lost. Returns how many were re-enqueued.

    Runs as an arq cron job, which arq runs on one worker only per tick.
    """
    store, queue = ctx["store"], ctx["queue"]
    now = clock.now()
    candidates = await store.unqueued_candidates(older_than=now - GRACE, limit=BATCH_SIZE)
    by_id = {job.id: job for job in candidates}
    missing = await queue.missing(list(by_id))
    for job_id in missing:
        due = by_id[job_id].next_attempt_at
        defer_s = max(0.0, (due - now).total_seconds()) if due else 0.0
        await queue.enqueue(job_id, defer_s=defer_s)
    if missing:
        logger.warning("reconciler re-enqueued %d job(s) missing from Redis", len(missing))
    return len(missing)
