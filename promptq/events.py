"""Job events over Redis pub/sub: workers publish, `GET /api/jobs/{id}/stream` listens.

Events only wake listeners up and carry the final summary's tokens as they are generated;
SQL stays the truth (a listener re-reads the job on every event and on a timer), so a lost
event costs at most one poll interval.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)


def channel(queue_name: str, job_id: str) -> str:
    """The pub/sub channel of one job's events."""
    return f"{queue_name}:events:{job_id}"


async def publish(redis: Redis, queue_name: str, job_id: str, event: dict[str, Any]) -> None:
    """Publish an event, best effort: Redis being down must not fail the job."""
    try:
        await redis.publish(channel(queue_name, job_id), orjson.dumps(event))
    except (RedisError, OSError) as exc:
        logger.debug("could not publish an event of job %s: %r", job_id, exc)
