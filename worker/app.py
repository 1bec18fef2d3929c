"""The worker factory: an arq Worker wired to our store, queue client and LLM client."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from typing import Any, cast

import aiohttp
from arq import Worker, func

from promptq.checkpoints import ChunkStore
from promptq.db import create_engine, create_sessionmaker, redact_url
from promptq.endpoints import load_endpoints
from promptq.limits import RedisLimits
from promptq.metrics import Metrics
from promptq.migrate import ensure_current
from promptq.queue import RUN_JOB, QueueClient, deserialize, redis_settings, serialize
from promptq.settings import Settings
from promptq.store import JobStore
from worker.ahead import AheadAgain
from worker.announce import StatusAnnouncer
from worker.cancel import CancelWatcher
from worker.context import WorkerContext
from worker.fastpoll import FastPollWorker
from worker.followers import FollowerWaker
from worker.jobs import run_job
from worker.leases import LeaseKeeper
from worker.limiter import Limiter
from worker.observe import MeteredLLMClient, Observability
from worker.reconcile import Reconciler
from worker.routing import ModelRouter, client_options
from worker.slots import ModelSlots

logger = logging.getLogger(__name__)

#: arq would fail a job after this many deliveries; promptq counts attempts itself, in SQL.
ARQ_MAX_TRIES = 1_000_000
#: Extra time arq allows a job beyond the LLM timeout, for the SQL writes around the call.
JOB_TIMEOUT_MARGIN_S = 30.0
#: Database connections a worker keeps open beyond one per job: the lease keeper, the
#: reconciler, the cancel watcher, the metrics, the follower waker.
POOL_EXTRA = 5
#: arq keeps a job's in-progress marker this much longer than the job timeout.
ARQ_MARKER_MARGIN_S = 10.0


def job_timeout_s(settings: Settings) -> float:
    """How long arq lets one attempt run: the call (for a summarize attempt, all its calls),
    and recording it through a DB outage.

    A summarize attempt makes many calls (each with its own LLM timeout), so arq's timeout, a
    backstop, allows for the longest of them: PROMPTQ_SUMMARY_TIMEOUT_S. It does not delay the
    recovery from a dead worker: the attempt's lease lapses after lease_s, and the reconciler
    then clears arq's in-progress marker (whose TTL follows this timeout) and re-enqueues it.
    """
    run_s = max(settings.llm_timeout_s + JOB_TIMEOUT_MARGIN_S, settings.summary_timeout_s)
    return run_s + settings.db_retry_s


def marker_ttl_s(settings: Settings) -> float:
    """The TTL arq gives a job's in-progress marker (its worst job timeout + 10 s)."""
    return job_timeout_s(settings) + ARQ_MARKER_MARGIN_S


def worker_name() -> str:
    """host:pid, recorded on every attempt."""
    return f"{socket.gethostname()}:{os.getpid()}"


def create_worker(
    settings: Settings, *, burst: bool = False, handle_signals: bool = True
) -> Worker:
    """Build the worker; on_startup opens its resources and on_shutdown closes them.

    The worker is a `FastPollWorker` (worker.fastpoll): arq's Worker kept alive through Redis
    outages (worker.resilient) and woken at once by enqueues, freed slots and due deferred
    jobs. It holds up to worker_concurrency + prefetch jobs, of which worker_concurrency work
    with the model at once (worker.slots), besides the jobs finishing (recording their
    outcome). Besides its poll loop, the worker runs background tasks: the lease keeper, which
    renews the leases of this worker's running attempts, the limiter's permit renewal, and the
    reconciler. A bad endpoints config raises ConfigError here, before anything starts.
    """
    endpoints = load_endpoints(settings)

    max_jobs = settings.worker_concurrency + settings.prefetch
    metrics = Metrics(refresh_s=settings.metrics_refresh_s)
    observability = Observability(settings, metrics)
    slots = ModelSlots(settings.worker_concurrency)

    async def startup(ctx: dict[str, Any]) -> None:
        # A connection per job slot and prefetched job, and a few for the background tasks.
        engine = create_engine(settings, pool_size=max_jobs + POOL_EXTRA)
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
        typed["ahead"] = AheadAgain(typed["queue"])
        typed["followers"] = FollowerWaker(typed["store"], typed["queue"])
        typed["followers"].start()
        typed["metrics"] = metrics
        limiter = Limiter(
            RedisLimits(ctx["redis"], settings.queue_name),
            endpoints,
            lease_s=settings.lease_s,
            wait_s=settings.limit_wait_s,
        )
        limiter.start()
        typed["limiter"] = limiter
        metrics.limits_source = limiter.readings
        typed["llm"] = ModelRouter(
            session,
            endpoints,
            limiter,
            chars_per_token=settings.chars_per_token,
            make_client=lambda endpoint: MeteredLLMClient(
                session, metrics=metrics, **client_options(endpoint)
            ),
        )
        typed["rng"] = random.Random()
        typed["slots"] = slots
        typed["announcer"] = StatusAnnouncer(ctx["redis"], settings.queue_name)
        typed["announcer"].start()
        typed["worker_name"] = worker_name()
        typed["cancels"] = CancelWatcher(
            ctx["redis"], settings.queue_name, typed["store"].sessionmaker
        )
        typed["cancels"].start()
        typed["leases"] = LeaseKeeper(
            typed["store"], lease_s=settings.lease_s, on_renew=typed["cancels"].check
        )
        typed["leases"].start()
        reconciler = Reconciler(typed["store"], typed["queue"], marker_ttl_s=marker_ttl_s(settings))
        ctx["_reconciler"] = asyncio.create_task(
            reconciler.run_forever(
                interval_s=settings.reconcile_interval_s, owner=typed["worker_name"]
            ),
            name="promptq-reconciler",
        )
        ctx["_engine"], ctx["_http"] = engine, session
        ctx["_observability"] = observability
        try:
            await observability.start(ctx, lambda: (slots.in_use, slots.size))
        except BaseException:
            await shutdown(ctx)
            raise
        logger.info(
            "worker %s: concurrency=%d prefetch=%d db=%s endpoints=%s queue=%s",
            typed["worker_name"],
            settings.worker_concurrency,
            settings.prefetch,
            redact_url(settings.resolved_database_url),
            ", ".join(f"{e.name}={e.base_url}" for e in endpoints.endpoints),
            settings.queue_name,
        )

    async def shutdown(ctx: dict[str, Any]) -> None:
        # arq has awaited every job task by now, so no lease is held any more.
        await observability.stop()
        if "_reconciler" in ctx:
            ctx["_reconciler"].cancel()
            await asyncio.gather(ctx["_reconciler"], return_exceptions=True)
        if "leases" in ctx:
            await ctx["leases"].stop()
        if "cancels" in ctx:
            await ctx["cancels"].stop()
        if "announcer" in ctx:
            await ctx["announcer"].stop()
        if "ahead" in ctx:
            await ctx["ahead"].stop()
        if "followers" in ctx:
            await ctx["followers"].stop()
        if "limiter" in ctx:
            await ctx["limiter"].stop()
        if "_http" in ctx:
            await ctx["_http"].close()
        if "_engine" in ctx:
            await ctx["_engine"].dispose()

    timeout_s = job_timeout_s(settings)
    worker = FastPollWorker(
        functions=[func(run_job, name=RUN_JOB, max_tries=ARQ_MAX_TRIES, timeout=timeout_s)],  # type: ignore[arg-type]
        queue_name=settings.queue_name,
        redis_settings=redis_settings(settings),
        on_startup=startup,
        on_shutdown=shutdown,
        max_jobs=max_jobs,
        job_timeout=timeout_s,
        keep_result=0,
        poll_delay=settings.worker_poll_delay_s,
        max_tries=ARQ_MAX_TRIES,
        job_serializer=serialize,
        job_deserializer=deserialize,
        burst=burst,
        handle_signals=handle_signals,
        slots=slots,
        # On SIGTERM/SIGINT stop taking jobs, let in-flight ones finish for up to this long,
        # then cancel them: run_job records them as interrupted and hands them back.
        job_completion_wait=settings.worker_grace_s,
    )
    worker.stop_hooks.append(slots.close)  # prefetched jobs go back at once, not after the grace
    return worker
