"""The worker factory: an arq Worker wired to our store, queue client and LLM client."""

from __future__ import annotations

import logging
import os
import random
import socket
from typing import Any, cast

import aiohttp
from arq import Worker, cron, func

from promptq.checkpoints import ChunkStore
from promptq.db import create_engine, create_sessionmaker, redact_url
from promptq.migrate import ensure_current
from promptq.queue import RUN_JOB, QueueClient, deserialize, redis_settings, serialize
from promptq.settings import Settings
from promptq.store import JobStore
from worker.context import WorkerContext
from worker.jobs import run_job
from worker.llm import LLMClient
from worker.reconcile import reconcile

logger = logging.getLogger(__name__)

#: arq would fail a job after this many deliveries; promptq counts attempts itself, in SQL.
ARQ_MAX_TRIES = 1_000_000
#: Extra time arq allows a job beyond the LLM timeout, for the SQL writes around the call.
JOB_TIMEOUT_MARGIN_S = 30.0
#: Seconds of each minute at which the reconciler runs.
RECONCILE_SECONDS = {0, 15, 30, 45}


def worker_name() -> str:
    """host:pid, recorded on every attempt."""
    return f"{socket.gethostname()}:{os.getpid()}"


def create_worker(
    settings: Settings, *, burst: bool = False, handle_signals: bool = True
) -> Worker:
    """Build an arq Worker; on_startup opens its resources and on_shutdown closes them."""

    async def startup(ctx: dict[str, Any]) -> None:
        engine = create_engine(settings)
        try:
            await ensure_current(engine)
        except BaseException:
            await engine.dispose()
            raise
        session = aiohttp.ClientSession()
        typed = cast(WorkerContext, ctx)
        typed["settings"] = settings
        typed["store"] = JobStore(create_sessionmaker(engine))
        typed["checkpoints"] = ChunkStore(typed["store"].sessionmaker)
        typed["queue"] = QueueClient(ctx["redis"], settings.queue_name)
        typed["llm"] = LLMClient(
            session,
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key.get_secret_value() if settings.llm_api_key else None,
            timeout_s=settings.llm_timeout_s,
        )
        typed["rng"] = random.Random()
        typed["worker_name"] = worker_name()
        typed["lease_s"] = job_timeout_s
        ctx["_engine"], ctx["_http"] = engine, session
        logger.info(
            "worker %s: concurrency=%d db=%s llm=%s queue=%s",
            typed["worker_name"],
            settings.worker_concurrency,
            redact_url(settings.resolved_database_url),
            settings.llm_base_url,
            settings.queue_name,
        )

    async def shutdown(ctx: dict[str, Any]) -> None:
        if "_http" in ctx:
            await ctx["_http"].close()
        if "_engine" in ctx:
            await ctx["_engine"].dispose()

    job_timeout_s = settings.llm_timeout_s + JOB_TIMEOUT_MARGIN_S
    # A summarize attempt makes many calls and renews its lease as it goes, so arq's timeout
    # (a backstop: every call has its own) must allow for the longest of them.
    run_timeout_s = max(job_timeout_s, settings.summary_timeout_s)
    return Worker(
        functions=[func(run_job, name=RUN_JOB, max_tries=ARQ_MAX_TRIES, timeout=run_timeout_s)],  # type: ignore[arg-type]
        cron_jobs=[
            cron(reconcile, second=RECONCILE_SECONDS, run_at_startup=True, timeout=60),  # type: ignore[arg-type]
        ],
        queue_name=settings.queue_name,
        redis_settings=redis_settings(settings),
        on_startup=startup,
        on_shutdown=shutdown,
        max_jobs=settings.worker_concurrency,
        job_timeout=run_timeout_s,
        keep_result=0,
        poll_delay=settings.worker_poll_delay_s,
        max_tries=ARQ_MAX_TRIES,
        job_serializer=serialize,
        job_deserializer=deserialize,
        burst=burst,
        handle_signals=handle_signals,
    )
