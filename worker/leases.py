"""Heartbeat leases: a live worker keeps extending the lease of every attempt it is running.

The trade-off: a short lease lets the reconciler hand a dead worker's jobs to another worker
within about lease_s + reconcile_interval_s, but a worker that cannot renew for a whole lease
(event loop blocked, database unreachable, clocks skewed by more than the slack) loses its jobs
to another worker. That costs a second LLM call, never a second result: every write is
conditional on (status, attempts), so the slower attempt's result is refused. Renewing every
lease_s/3 means two renewals in a row can fail before anything is lost.

A renewal that finds an attempt no longer holding its job (cancelled, or taken over after a
lapse) marks it lost: work that makes many calls per attempt (summarize jobs) waits on
`lost(claim)` and stops instead of calling the model for a job that is no longer its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from promptq.store import Claim, JobStore
from worker.background import Background

logger = logging.getLogger(__name__)

#: Renewals per lease: renew every lease_s / RENEWALS_PER_LEASE.
RENEWALS_PER_LEASE = 3


class LeaseKeeper(Background):
    """Tracks this worker's running attempts and renews their leases in one UPDATE per tick."""

    TASK_NAME = "promptq-lease-keeper"

    def __init__(
        self,
        store: JobStore,
        *,
        lease_s: float,
        on_renew: Callable[[Mapping[str, int]], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        #: Called with the held attempts after each renewal (worker.cancel checks for cancels).
        self.on_renew = on_renew
        self.lease_s = lease_s
        self.renew_every_s = lease_s / RENEWALS_PER_LEASE
        #: job id -> attempt number, for every attempt this worker is running.
        self.held: dict[str, int] = {}
        #: job id -> set once a renewal found the held attempt no longer owns the job.
        self._lost: dict[str, asyncio.Event] = {}

    def hold(self, claim: Claim) -> None:
        """Start renewing this attempt's lease."""
        self.held[claim.job_id] = claim.number
        self._lost[claim.job_id] = asyncio.Event()

    def release(self, claim: Claim) -> None:
        """Stop renewing this attempt's lease."""
        if self.held.get(claim.job_id) == claim.number:
            del self.held[claim.job_id]
            self._lost.pop(claim.job_id, None)

    def lost(self, claim: Claim) -> asyncio.Event:
        """An event set once this attempt is found to no longer own its job (already set for
        an attempt that is not held)."""
        event = self._lost.get(claim.job_id)
        if event is None or self.held.get(claim.job_id) != claim.number:
            event = asyncio.Event()
            event.set()
        return event

    async def renew(self) -> int:
        """Renew every held lease now; returns how many the database still had."""
        held = dict(self.held)
        if not held:
            return 0
        renewed = await self.store.renew_leases(held, lease_s=self.lease_s)
        if renewed < len(held):
            # Finished a moment ago, cancelled, or taken over after a lapse: the conditional
            # writes of those attempts will be refused, so nothing is written twice. Tell
            # the ones still running, so they stop early.
            logger.debug("renewed %d of %d leases", renewed, len(held))
            holding = await self.store.holding(held)
            for job_id, number in held.items():
                event = self._lost.get(job_id)
                if job_id not in holding and self.held.get(job_id) == number and event:
                    event.set()
        return renewed

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.renew_every_s)
            try:
                await self.renew()
                if self.on_renew is not None and self.held:
                    await self.on_renew(dict(self.held))
            except Exception:  # the database may be briefly away; the next tick tries again
                logger.warning("could not renew %d lease(s)", len(self.held), exc_info=True)
