"""Server-sent events and the Redis pub/sub they follow: the pieces every event stream shares
(api.stream, the dashboard's api.dashboard.events, api.job_listener)."""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import orjson
from aiohttp import web
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError


async def send_event(response: web.StreamResponse, event: str, data: dict[str, Any]) -> None:
    """Write one event: its name, and `data` as JSON."""
    await response.write(b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")


async def close_pubsub(pubsub: PubSub) -> None:
    """Close a subscription; a Redis already gone is not an error."""
    with suppress(RedisError, OSError):
        await pubsub.aclose()  # type: ignore[no-untyped-call]
