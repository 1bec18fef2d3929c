"""`GET /ui/events`: the dashboard's live feed of job changes, as server-sent events.

Workers publish an event on `<queue>:events:<job id>` at every status change (promptq.events);
this stream listens to all of them with one pattern subscription, coalesces what arrives within
COALESCE_S, re-reads those jobs from SQL (only the caller's: another tenant's job reads as
missing) and sends one `job` event per job: `{"id", "status", "attempts", "max_attempts"}`.
Token events are ignored. Without Redis pub/sub it sends a `poll` event every POLL_S instead, and
the page re-reads itself. A `hello` event opens the stream.

The key is checked again as the stream goes (api.auth.KeyCheck): once it is revoked the stream
sends a `revoked` event and ends, and the page goes to the login.

A stream never ends by itself, so the app's shutdown closes the open ones (api.shutdown)
rather than wait out its grace for them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress

import orjson
from aiohttp import web
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from api import auth
from api.auth import key_check, principal
from api.shutdown import SHUTDOWN
from api.sse import close_pubsub, send_event
from api.state import SERVICE
from api.stream import KEEPALIVE_S
from promptq import events
from promptq.service import JobService

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()

#: How long changes are gathered into one read after the first arrives.
COALESCE_S = 0.2
#: Without pub/sub: how often the page is told to re-read itself.
POLL_S = 2.0
#: Most jobs re-read at once; more changes than that wait for the next round.
MAX_IDS = 500


@routes.get("/ui/events", name="dashboard:events")
async def dashboard_events(request: web.Request) -> web.StreamResponse:
    """Server-sent `job` events for every change to a job the caller may see."""
    service = request.app[SERVICE]
    owned_by = principal(request).owner_filter
    key = key_check(request)
    pubsub = await _subscribe_all(service)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    try:
        with request.app[SHUTDOWN].stream():
            await response.prepare(request)
            await send_event(response, "hello", {"live": pubsub is not None})
            while await key.still_valid():
                if pubsub is None:
                    await _sleep_then_poll(response)
                    continue
                job_ids = await _changed_jobs(pubsub, min(KEEPALIVE_S, auth.KEY_RECHECK_S))
                if job_ids is None:  # pub/sub broke: poll from now on
                    await close_pubsub(pubsub)
                    pubsub = None
                    continue
                if not job_ids:
                    await response.write(b": keep-alive\n\n")
                    continue
                states = await service.store.get_states(sorted(job_ids), owned_by=owned_by)
                for state in states.values():
                    await send_event(
                        response,
                        "job",
                        {
                            "id": state.id,
                            "status": state.status,
                            "attempts": state.attempts,
                            "max_attempts": state.max_attempts,
                        },
                    )
            logger.info("dashboard events: the key was revoked; ending the stream")
            await send_event(response, "revoked", {})
    except ConnectionResetError:
        logger.debug("dashboard events: the client went away")
    finally:
        if pubsub is not None:
            await close_pubsub(pubsub)
    return response


async def _sleep_then_poll(response: web.StreamResponse) -> None:
    await asyncio.sleep(POLL_S)
    await send_event(response, "poll", {})


async def _changed_jobs(pubsub: PubSub, wait_s: float) -> set[str] | None:
    """Ids of jobs that changed: waits up to `wait_s` for the first, then COALESCE_S more.

    An empty set means nothing happened; None means pub/sub failed.
    """
    found: set[str] = set()
    deadline = time.monotonic() + wait_s
    while len(found) < MAX_IDS and (left_s := deadline - time.monotonic()) > 0:
        try:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left_s)
        except (RedisError, OSError) as exc:
            logger.info("dashboard events: Redis pub/sub failed (%r); polling", exc)
            return None
        if message is None:
            continue
        job_id = _job_id(message)
        if job_id is not None and job_id not in found:
            found.add(job_id)
            deadline = min(deadline, time.monotonic() + COALESCE_S)
    return found


def _job_id(message: dict[str, object]) -> str | None:
    """The job a status event is about; None for token events and anything unreadable."""
    channel, data = message.get("channel"), message.get("data")
    if not isinstance(channel, bytes) or not isinstance(data, bytes):
        return None
    with suppress(orjson.JSONDecodeError):
        event = orjson.loads(data)
        if isinstance(event, dict) and event.get("type") == "token":
            return None
    return channel.rsplit(b":", 1)[-1].decode("ascii", "replace")


async def _subscribe_all(service: JobService) -> PubSub | None:
    pubsub = service.queue.redis.pubsub()
    try:
        await pubsub.psubscribe(events.channel(service.queue.queue_name, "*"))
    except (RedisError, OSError) as exc:
        logger.info("dashboard events: no Redis pub/sub (%r); polling", exc)
        await close_pubsub(pubsub)
        return None
    return pubsub
