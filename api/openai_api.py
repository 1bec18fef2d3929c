"""The OpenAI-compatible API under /v1: routes, its error shape, and the resources it needs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import suppress

import aiohttp
from aiohttp import web

from api import openai_batches, openai_chat, openai_files
from api.openai_errors import openai_error_middleware
from api.state import SERVICE, SETTINGS
from promptq.chat import ChatService
from promptq.endpoints import load_endpoints
from promptq.model_catalog import ModelCatalog, ModelSource
from promptq.openai_batch import OpenAIBatches
from promptq.outage import OutageLog

logger = logging.getLogger(__name__)

#: The Redis lock (under the queue name) that lets one API process per interval sweep batches.
SWEEP_LOCK = "openai-batch-sweep"


def setup(app: web.Application) -> None:
    """Add the /v1 routes, the OpenAI error shape and their resources to the API app.

    Call after the app's own resources are registered: these use its JobService.
    """
    app.middlewares.insert(0, openai_error_middleware)  # outermost: sees every error response
    app.router.add_routes(openai_chat.routes)
    app.router.add_routes(openai_files.routes)
    app.router.add_routes(openai_batches.routes)
    app.cleanup_ctx.append(_resources)


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    sources = [
        ModelSource(e.name, e.base_url, e.api_key, e.patterns)
        for e in load_endpoints(settings).endpoints  # routed as the workers route calls
    ]
    session = aiohttp.ClientSession()
    app[openai_chat.CATALOG] = ModelCatalog(session, sources, ttl_s=settings.models_cache_s)
    app[openai_chat.CHAT] = ChatService(app[SERVICE])
    sweeper = asyncio.create_task(_sweep_batches(app), name="promptq-openai-batch-sweep")
    try:
        yield
    finally:
        sweeper.cancel()
        with suppress(asyncio.CancelledError):
            await sweeper
        await session.close()


async def _sweep_batches(app: web.Application) -> None:
    """Move OpenAI batches along (finalize, expire) even when nobody reads them."""
    service = app[SERVICE]
    interval_s = service.settings.reconcile_interval_s
    batches = OpenAIBatches(service, app[openai_chat.CATALOG])
    outage = OutageLog(logger, "OpenAI batch sweep")
    while True:
        await asyncio.sleep(interval_s)
        try:
            if await service.queue.try_lock(SWEEP_LOCK, owner="api", ttl_s=interval_s * 0.9):
                await batches.sweep()
            outage.ok()
        except Exception as exc:  # the database or Redis is away; try again next interval
            outage.failed(exc, "trying again next interval")
