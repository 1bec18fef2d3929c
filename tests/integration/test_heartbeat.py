"""The worker heartbeat in real Redis, and the check behind `promptq worker --check`.

Given a heartbeat refreshed every 0.1 s with a TTL of three beats, when its process stops
beating without cleaning up (killed, frozen), then the check turns unhealthy on its own within
the TTL; a beat of another host never counts; and an unreachable Redis is unhealthy, with a
one-line reason.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from promptq.settings import Settings
from tests.conftest import base_settings, wait_for
from worker.heartbeat import Heartbeat, check, heartbeat_key


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    """Redis only: the database plays no part in the heartbeat."""
    return base_settings(tmp_path, f"sqlite+aiosqlite:///{tmp_path}/unused.db", redis_url=redis_url)


async def test_a_heartbeat_that_stops_expires_by_itself(settings: Settings) -> None:
    host = socket.gethostname()
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        assert not (await check(settings))[0]
        other = Heartbeat(
            redis,
            heartbeat_key(settings.queue_name, "some-other-host:1"),
            interval_s=10,
            info=lambda: {"running": 1},
        )
        await other.beat()
        healthy, line = await check(settings)
        assert not healthy and host in line  # another host's worker is not this host's

        beat = Heartbeat(
            redis,
            heartbeat_key(settings.queue_name, f"{host}:4242"),
            interval_s=0.1,
            info=lambda: {"running": 3, "concurrency": 10},
        )
        beat.start()
        await wait_for(lambda: _healthy(settings, True), timeout_s=5)
        healthy, line = await check(settings)
        assert healthy and line.startswith(f"ok: 1 worker(s) on {host}") and "3 job(s)" in line

        # A killed or frozen worker: it stops beating and deletes nothing.
        assert beat._task is not None
        beat._task.cancel()
        await asyncio.gather(beat._task, return_exceptions=True)
        await wait_for(lambda: _healthy(settings, False), timeout_s=5)
        assert await redis.exists(other.key)  # the other host's beat is untouched
    finally:
        await redis.aclose()


async def test_unreachable_redis_is_unhealthy(settings: Settings) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    healthy, line = await check(settings.with_overrides(redis_url=f"redis://127.0.0.1:{port}/0"))
    assert not healthy
    assert line.startswith("unhealthy: Redis is unreachable") and "\n" not in line


async def _healthy(settings: Settings, expected: bool) -> bool:
    return (await check(settings))[0] is expected
