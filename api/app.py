"""The aiohttp app factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from pydantic import BaseModel

from api import batches, cancel, dashboard, jobs, openai_api, openapi, shutdown, stream, uploads
from api.auth import AUTHENTICATOR, Authenticator, auth_middleware
from api.errors import error_middleware, error_response
from api.metrics import setup_metrics
from api.state import SERVICE, SETTINGS
from promptq import __version__
from promptq.db import create_engine, create_sessionmaker, redact_url
from promptq.errors import ServiceUnavailable
from promptq.keys import KeyStore
from promptq.migrate import ensure_current
from promptq.queue import QueueClient
from promptq.service import JobService
from promptq.settings import Settings
from promptq.store import JobStore

logger = logging.getLogger(__name__)


def create_app(settings: Settings) -> web.Application:
    """Build the API app. The engine and Redis pool live exactly as long as the app."""
    app = web.Application(
        middlewares=[error_middleware, auth_middleware, openapi.query_middleware],
        client_max_size=settings.api_max_body_bytes,
    )
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_resources)
    shutdown.setup(app, settings.api_shutdown_grace_s)
    app.router.add_get("/healthz", healthz)
    setup_metrics(app, settings)
    app.router.add_routes(uploads.routes)
    app.router.add_routes(jobs.routes)
    app.router.add_routes(stream.routes)
    app.router.add_routes(batches.routes)
    app.router.add_routes(cancel.routes)
    dashboard.setup(app)
    openai_api.setup(app)  # /v1: the OpenAI-compatible API
    openapi.setup(app, title="promptq", version=__version__)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    engine = create_engine(settings)
    try:
        await ensure_current(engine)
        queue = await QueueClient.connect(settings)
    except BaseException:
        await engine.dispose()
        raise
    sessionmaker = create_sessionmaker(engine)
    app[SERVICE] = JobService(settings, JobStore(sessionmaker), queue)
    if settings.auth_disabled:
        logger.warning(
            "AUTH IS DISABLED (PROMPTQ_AUTH_DISABLED=true): anyone who can reach this API can "
            "submit jobs and read every job. Use this for local development only."
        )
    else:
        app[AUTHENTICATOR] = Authenticator(KeyStore(sessionmaker), ttl_s=settings.api_key_cache_s)
        logger.info(
            "api: API keys required; a checked key is trusted for %g s", settings.api_key_cache_s
        )
    logger.info(
        "api: db=%s redis=%s",
        redact_url(settings.resolved_database_url),
        redact_url(settings.redis_url),
    )
    try:
        yield
    finally:
        await queue.close()
        await engine.dispose()


class HealthOut(BaseModel):
    """Every backing service answers."""

    status: str
    checks: dict[str, str]


@openapi.operation(responses={200: HealthOut}, public=True, tags=("health",))
async def healthz(request: web.Request) -> web.Response:
    """200 when both Redis and the database answer, else 503 naming what is down."""
    service = request.app[SERVICE]
    checks: dict[str, str] = {}
    for name, probe in (("database", service.store.ping), ("redis", service.queue.ping)):
        try:
            await probe()
            checks[name] = "ok"
        except ServiceUnavailable as exc:
            checks[name] = exc.message
    if all(v == "ok" for v in checks.values()):
        return web.json_response({"status": "ok", "checks": checks})
    down = ", ".join(k for k, v in checks.items() if v != "ok")
    response = error_response(503, "unhealthy", f"unavailable: {down}", {"Retry-After": "2"})
    return response
