"""The OpenAI-compatible API under /v1: routes, its error shape, and the resources it needs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from api import openai_chat
from api.openai_errors import openai_error_middleware
from api.state import SERVICE, SETTINGS
from promptq.chat import ChatService
from promptq.model_catalog import ModelCatalog


def setup(app: web.Application) -> None:
    """Add the /v1 routes, the OpenAI error shape and their resources to the API app.

    Call after the app's own resources are registered: these use its JobService.
    """
    app.middlewares.insert(0, openai_error_middleware)  # outermost: sees every error response
    app.router.add_routes(openai_chat.routes)
    app.cleanup_ctx.append(_resources)


async def _resources(app: web.Application) -> AsyncIterator[None]:
    session = aiohttp.ClientSession()
    app[openai_chat.CATALOG] = ModelCatalog(session, app[SETTINGS])
    app[openai_chat.CHAT] = ChatService(app[SERVICE])
    try:
        yield
    finally:
        await session.close()
