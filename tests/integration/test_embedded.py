"""Embedded defaults: which Redis `promptq demo` / `promptq up` use, and the embedded server."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from promptq.embedded import embedded_redis, resolve_redis
from promptq.settings import Settings
from tests.conftest import REDIS_TEST_URL, base_settings
from tests.e2e.conftest import free_port


async def test_embedded_redis_persists_across_restarts(tmp_path: Path) -> None:
    async with embedded_redis(tmp_path) as url:
        client = aioredis.Redis.from_url(url)
        await client.set("promptq:kept", "yes")
        await client.aclose()
    # Persistence is the append-only file alone (RDB snapshots are off).
    assert (tmp_path / "redis" / "appendonly.aof").stat().st_size > 0
    assert not (tmp_path / "redis" / "dump.rdb").exists()

    async with embedded_redis(tmp_path) as url:  # a new process, same data dir
        client = aioredis.Redis.from_url(url)
        assert await client.get("promptq:kept") == b"yes"
        await client.aclose()


async def test_an_explicit_redis_url_is_used_as_is_and_logged_without_its_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = base_settings(tmp_path, "sqlite+aiosqlite:///x.db", redis_url=REDIS_TEST_URL)
    async with resolve_redis(settings) as resolved:
        assert resolved.redis_url == REDIS_TEST_URL
    # A password in the URL (Redis's usual form has no user name) is never logged
    with_password = REDIS_TEST_URL.replace("redis://", "redis://:hunter2pw@")
    caplog.set_level(logging.INFO, logger="promptq.embedded")
    async with resolve_redis(settings.with_overrides(redis_url=with_password)) as resolved:
        assert resolved.redis_url == with_password
    assert "redis://:***@" in caplog.text and "hunter2pw" not in caplog.text


async def test_without_a_url_or_a_local_server_an_embedded_one_starts(tmp_path: Path) -> None:
    # Nothing listens on this port, and the URL counts as a default (not set by the user).
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    settings = Settings.model_construct(
        _fields_set=set(), **(base_settings(tmp_path, "").model_dump() | {"redis_url": unreachable})
    )
    async with resolve_redis(settings) as resolved:
        assert resolved.redis_url != unreachable
        client = aioredis.Redis.from_url(resolved.redis_url)
        assert await client.ping()
        await client.aclose()


async def test_the_embedded_redis_is_stopped_on_exit(tmp_path: Path) -> None:
    async with embedded_redis(tmp_path) as url:
        client = aioredis.Redis.from_url(url, socket_connect_timeout=0.5)
        assert await client.ping()
    with pytest.raises(RedisConnectionError):
        await client.ping()
    await client.aclose()
    log = (tmp_path / "redis" / "redis.log").read_text()
    assert "Ready to accept connections" in log and "ready to exit" in log  # a clean shutdown
