"""Retry the worker's SQL writes through a database outage, so no result it has is dropped.

A worker that already has the model's answer must not lose it because PostgreSQL restarted or
the network blinked: the write is retried with capped, jittered backoff for up to
`Settings.db_retry_s` (logging every retry), then the error is raised. Only connection-level
errors are retried; anything else (a constraint violation, a bug) is raised at once. Every
write the worker makes is conditional on its attempt, so repeating one that did commit before
the connection broke is refused rather than applied twice. (Which errors count as "down":
`promptq.db.is_db_unavailable`.)
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from promptq.db import is_db_unavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Backoff: full jitter on BASE·2^n, capped low so a result lands within about a second of the
#: database coming back (before the reconciler hands the job to another worker).
RETRY_BASE_S = 0.1
RETRY_CAP_S = 1.0


async def retry_db(
    operation: Callable[[], Awaitable[T]],
    *,
    what: str,
    give_up_after_s: float,
    rng: random.Random | None = None,
) -> T:
    """Await `operation()` until it succeeds, retrying connection errors for give_up_after_s."""
    started = time.monotonic()
    failures = 0
    while True:
        try:
            result = await operation()
        except Exception as exc:
            if not is_db_unavailable(exc):
                raise
            failures += 1
            waited_s = time.monotonic() - started
            if waited_s >= give_up_after_s:
                logger.error(
                    "database still unreachable after %.1f s; giving up on %s", waited_s, what
                )
                raise
            delay_s = (rng or random).uniform(0, min(RETRY_CAP_S, RETRY_BASE_S * 2**failures))
            delay_s = min(delay_s, max(0.0, give_up_after_s - waited_s))
            logger.warning(
                "database unavailable during %s (%s); retry %d in %.2f s",
                what,
                exc.__class__.__name__,
                failures,
                delay_s,
            )
            await asyncio.sleep(delay_s)
            continue
        if failures:
            logger.warning("database is back: %s done after %d retries", what, failures)
        return result
