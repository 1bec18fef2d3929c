"""Status events, coalesced: one Redis pipeline per event-loop turn instead of one PUBLISH each.

Every job announces twice (claimed, finished) that listeners should re-read it from SQL
(promptq.events). At hundreds of jobs a second, a round trip per announcement is a good part of
a worker's CPU (each is a socket write and read). `announce()` only notes the job id; a
background task publishes all the ids noted since its last turn in one pipeline. A job noted
twice before a flush is published once: an event means "look again", so that loses nothing.

Best effort, as promptq.events.publish: with Redis away the ids are dropped (listeners also
re-read on a timer). `stop()` publishes what is still pending.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from promptq import events
from worker.background import Background

logger = logging.getLogger(__name__)

_STATUS = orjson.dumps({"type": "status"})


class StatusAnnouncer(Background):
    """Publishes `{"type": "status"}` on the channels of the jobs noted with `announce`."""

    TASK_NAME = "promptq-status-events"

    def __init__(self, redis: Redis, queue_name: str) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self._pending: dict[str, None] = {}  # insertion-ordered set
        self._noted = asyncio.Event()

    def announce(self, job_id: str) -> None:
        """Have the job's status event published shortly (at the next flush)."""
        self._pending[job_id] = None
        self._noted.set()

    async def stop(self) -> None:
        """Stop, publishing what is pending first."""
        await super().stop()
        await self.flush()

    async def flush(self) -> None:
        """Publish every pending event now, in one pipeline."""
        if not self._pending:
            return
        job_ids, self._pending = list(self._pending), {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.publish(events.channel(self.queue_name, job_id), _STATUS)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            logger.debug("could not publish %d status event(s): %r", len(job_ids), exc)
        except Exception:  # never let the flusher die: listeners would only poll
            logger.exception("publishing %d status event(s) failed", len(job_ids))

    async def _run(self) -> None:
        while True:
            await self._noted.wait()
            self._noted.clear()
            await self.flush()
