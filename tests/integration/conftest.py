"""Fixtures shared by the integration tests of the global limits (promptq.limits)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from promptq.limits import RedisLimits


@pytest.fixture
async def limits(redis_url: str) -> AsyncIterator[RedisLimits]:
    """The limit scripts on the test's Redis database."""
    client = Redis.from_url(redis_url)
    yield RedisLimits(client, "promptq:test")
    await client.aclose()


def pid() -> str:
    """A new permit id."""
    return uuid.uuid4().hex
