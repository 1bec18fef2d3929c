"""Follow one job until it ends: its streamed tokens as they come, then its final row.

The worker publishes on the job's Redis channel (promptq.events): `token` events while it
streams an answer, and `status` events when the job changes. SQL stays the truth: the job is
re-read on every status event and at least every POLL_S, so a lost event (or Redis pub/sub
being away) only costs time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from api.shutdown import Shutdown
from api.sse import close_pubsub
from promptq import events
from promptq.errors import NotFound
from promptq.models import Job, JobStatus
from promptq.service import JobService

logger = logging.getLogger(__name__)

#: Longest the listener goes without re-reading the job from SQL.
POLL_S = 0.25
#: How long the end waits for token events still in flight from the worker.
DRAIN_S = 0.05


@dataclass(frozen=True, slots=True)
class Token:
    """A piece of an answer being streamed; `call` tells apart the model calls of a job, and
    `model` is the model writing it, if the worker said."""

    call: str
    text: str
    model: str | None = None


class JobListener:
    """Subscribe before the job is enqueued (so no event is missed), then `follow` it."""

    def __init__(self, service: JobService, job_id: str) -> None:
        self.service = service
        self.job_id = job_id
        self._pubsub: PubSub | None = None

    async def __aenter__(self) -> JobListener:
        queue = self.service.queue
        pubsub = queue.redis.pubsub()
        try:
            await pubsub.subscribe(events.channel(queue.queue_name, self.job_id))
        except (RedisError, OSError) as exc:
            logger.info("job %s: no Redis pub/sub (%r); polling SQL", self.job_id, exc)
            await close_pubsub(pubsub)
        else:
            self._pubsub = pubsub
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._pubsub is not None:
            await close_pubsub(self._pubsub)
            self._pubsub = None

    async def follow(self, timeout_s: float, shutdown: Shutdown) -> AsyncIterator[Token | Job]:
        """Yield Tokens as they arrive, then the finished job (last). TimeoutError after
        `timeout_s` without the job finishing; api.shutdown.Stopping when the API stops first.
        """
        store = self.service.store
        deadline = time.monotonic() + timeout_s
        while True:
            shutdown.check(f"job {self.job_id} goes on: read it at /api/jobs/{self.job_id}")
            state = (await store.get_states([self.job_id])).get(self.job_id)
            if state is None:
                raise NotFound(f"job {self.job_id} was deleted")
            if JobStatus(state.status).is_terminal:
                async for token in self.tokens(DRAIN_S):
                    yield token
                job = await store.get_job(self.job_id)
                if job is None:
                    raise NotFound(f"job {self.job_id} was deleted")
                yield job
                return
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                raise TimeoutError
            async for token in self.tokens(min(POLL_S, left_s)):
                yield token

    async def tokens(self, wait_s: float) -> AsyncIterator[Token]:
        """Tokens for up to `wait_s`, returning early on any other event (go read SQL)."""
        if self._pubsub is None:
            await asyncio.sleep(wait_s)
            return
        deadline = time.monotonic() + wait_s
        while (left_s := deadline - time.monotonic()) > 0:
            try:
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=left_s
                )
            except (RedisError, OSError) as exc:
                logger.info("job %s: Redis pub/sub failed (%r); polling SQL", self.job_id, exc)
                await close_pubsub(self._pubsub)
                self._pubsub = None
                return
            if message is None:
                continue
            try:
                event = orjson.loads(message["data"])
            except (orjson.JSONDecodeError, TypeError):
                continue
            if not isinstance(event, dict) or event.get("type") != "token":
                return
            model = event.get("model")
            yield Token(
                call=str(event.get("call", "")),
                text=str(event.get("text", "")),
                model=model if isinstance(model, str) else None,
            )
