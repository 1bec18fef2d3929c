"""A worker's heartbeat in Redis, and the check that reads it (`promptq worker --check`).

Each worker sets `<queue_name>:heartbeat:<host>:<pid>` every `worker_heartbeat_s` with a TTL
of three beats, from a background task of its event loop. A worker whose loop is stuck, or
that lost Redis, or that died, lets its key expire; one that stops cleanly deletes it.

`promptq worker --check` passes when some worker *on this host* has a fresh key: in a
container that is the container's worker (its hostname is the container's), under systemd
any worker of the machine.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from promptq.outage import OutageLog
from promptq.settings import Settings
from worker.background import Background

logger = logging.getLogger(__name__)

#: A heartbeat key lives this many beats: two can be missed before the check fails.
TTL_BEATS = 3
#: How long `--check` waits for Redis.
CHECK_TIMEOUT_S = 3.0


def heartbeat_key(queue_name: str, worker_name: str) -> str:
    """The Redis key of one worker's heartbeat (worker_name is host:pid)."""
    return f"{queue_name}:heartbeat:{worker_name}"


class Heartbeat(Background):
    """Refreshes one worker's heartbeat key until stopped; Redis errors are only logged."""

    TASK_NAME = "promptq-heartbeat"

    def __init__(
        self,
        redis: Any,
        key: str,
        *,
        interval_s: float,
        info: Callable[[], dict[str, Any]],
    ) -> None:
        self._redis = redis
        self.key = key
        self.interval_s = interval_s
        self._info = info

    async def beat(self) -> None:
        """Set the key once, with its TTL."""
        value = orjson.dumps({"at": time.time(), **self._info()})
        ttl_ms = max(1, round(self.interval_s * TTL_BEATS * 1000))
        await self._redis.set(self.key, value, px=ttl_ms)

    async def stop(self) -> None:
        """Stop beating and delete the key (a stopped worker is not a healthy one)."""
        await super().stop()
        with suppress(RedisError, OSError):
            await self._redis.delete(self.key)

    async def _run(self) -> None:
        outage = OutageLog(logger, "heartbeat")
        while True:
            try:
                await self.beat()
                outage.ok()
            except (RedisError, OSError) as exc:
                outage.failed(exc)
            await asyncio.sleep(self.interval_s)


async def check(settings: Settings, *, host: str | None = None) -> tuple[bool, str]:
    """(healthy, one-line message): is a worker on `host` (default: this one) beating?"""
    host = host or socket.gethostname()
    pattern = heartbeat_key(settings.queue_name, f"{host}:*")
    redis = Redis.from_url(
        settings.redis_url, socket_timeout=CHECK_TIMEOUT_S, socket_connect_timeout=CHECK_TIMEOUT_S
    )
    try:
        keys = [key async for key in redis.scan_iter(match=pattern, count=1000)]
        values = await redis.mget(keys) if keys else []
    except (RedisError, OSError) as exc:
        return False, f"unhealthy: Redis is unreachable ({exc.__class__.__name__})"
    finally:
        with suppress(RedisError, OSError):
            await redis.aclose()
    beats = [orjson.loads(v) for v in values if v is not None]
    if not beats:
        return False, (
            f"unhealthy: no worker on {host} has a fresh heartbeat in queue {settings.queue_name}"
        )
    age_s = max(0.0, time.time() - max(float(b.get("at", 0)) for b in beats))
    running = sum(int(b.get("running", 0)) for b in beats)
    return True, (
        f"ok: {len(beats)} worker(s) on {host}, last heartbeat {age_s:.1f} s ago, "
        f"{running} job(s) running"
    )
