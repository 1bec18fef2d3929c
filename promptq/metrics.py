"""Prometheus metrics: one `Metrics` (with its own CollectorRegistry) per API app or worker.

Counters and histograms are updated in process as work happens (no I/O per job). What lives
elsewhere (jobs by status in SQL, the queue's length in Redis, the global limiter's state) is
read when Prometheus scrapes, at most once every `refresh_s` however often it scrapes.

Series (all prefixed `promptq_`):

* `jobs{status}`: jobs in the database by status (one `GROUP BY`, cached).
* `queue_depth`: jobs in the arq queue, due or deferred (`ZCARD`).
* `attempts_total{kind,outcome,reason}`: finished attempts; `reason` is `http_<status>` or the
  error code (`llm_transient`, `prompt_truncated`, `deadline_exceeded`, ...), `none` on success.
* `retries_total{reason}`: attempts that failed and scheduled another.
* `llm_request_duration_seconds{model,endpoint,outcome}`: each call to the model endpoint.
* `llm_tokens_total{model,type}`: prompt and completion tokens the endpoint reported.
  (`model` is chosen by whoever submits a job: past MAX_MODEL_LABELS distinct models in one
  process, the rest are counted as `other`, so no client can grow the series without bound.)
* `llm_requests_in_flight{endpoint}`: calls this process has open right now.
* `worker_jobs_running`, `worker_concurrency`: a worker's busy and total job slots.
* `limiter_waits_total{limit}`, `limiter_wait_seconds_total{limit}`, `limit_in_flight{limit}`,
  `adaptive_limit{limit}`: from the global limiter, through `Metrics.limits_source`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from promptq.models import Job, JobStatus

logger = logging.getLogger(__name__)

#: Seconds a scrape-time reading (SQL, Redis, limiter) is reused before it is read again.
DEFAULT_REFRESH_S = 2.0
#: LLM call latency buckets, in seconds: from a cached answer to a long summary.
LLM_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True, slots=True)
class LimitReading:
    """One global limit as the limiter sees it; None where the limiter has no such number."""

    #: Which limit, e.g. `model:llama3.2` or `endpoint:api.openai.com`.
    name: str
    #: Requests holding a slot of this limit right now, across all workers.
    in_flight: int | None = None
    #: The current (adaptive) limit.
    limit: float | None = None
    #: Times a request had to wait for this limit, since the limiter started counting.
    waits_total: int | None = None
    #: Seconds spent waiting for this limit, in total.
    wait_seconds_total: float | None = None


#: Reads the global limiter's state (the `limits` module provides one).
LimitsSource = Callable[[], Awaitable[Sequence[LimitReading]]]
#: A scrape-time reading: updates gauges, may do I/O.
Refresher = Callable[[], Awaitable[None]]


#: Most distinct `model` label values one process reports; later models count as OTHER_MODEL.
MAX_MODEL_LABELS = 100
OTHER_MODEL = "other"


def endpoint_label(base_url: str) -> str:
    """The host[:port] of an endpoint URL, without credentials or path: a safe label."""
    parts = urlsplit(base_url)
    host = parts.hostname or base_url
    return f"{host}:{parts.port}" if parts.port else host


def attempt_reason(status_code: int | None, error_code: str | None) -> str:
    """The `reason` label of an attempt: the HTTP status of a failure, else its error code."""
    if status_code is not None and status_code >= 400:
        return f"http_{status_code}"
    return error_code or "none"


class Metrics:
    """The metrics of one process role ("api" or "worker"), in a registry of their own."""

    def __init__(self, *, refresh_s: float = DEFAULT_REFRESH_S) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.refresh_s = refresh_s
        #: The `model` label values given out so far (at most MAX_MODEL_LABELS).
        self._models: set[str] = set()
        self._models_capped = False
        r = self.registry
        self.jobs = Gauge("promptq_jobs", "Jobs in the database by status.", ["status"], registry=r)
        self.queue_depth = Gauge(
            "promptq_queue_depth", "Jobs in the arq queue in Redis, due or deferred.", registry=r
        )
        self.attempts = Counter(
            "promptq_attempts",
            "Finished job attempts by kind, outcome and reason.",
            ["kind", "outcome", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "promptq_retries",
            "Failed attempts that scheduled a retry, by reason.",
            ["reason"],
            registry=r,
        )
        self.llm_latency = Histogram(
            "promptq_llm_request_duration_seconds",
            "Duration of calls to the model endpoint.",
            ["model", "endpoint", "outcome"],
            buckets=LLM_BUCKETS_S,
            registry=r,
        )
        self.tokens = Counter(
            "promptq_llm_tokens",
            "Tokens reported by the model endpoint.",
            ["model", "type"],
            registry=r,
        )
        self.llm_in_flight = Gauge(
            "promptq_llm_requests_in_flight",
            "Calls to the model endpoint this process has open.",
            ["endpoint"],
            registry=r,
        )
        self.refresh_errors = Counter(
            "promptq_metrics_refresh_errors",
            "Scrape-time readings (SQL, Redis, limiter) that failed; old values were served.",
            ["source"],
            registry=r,
        )
        #: Set by whoever owns the global limiter; read at scrape time.
        self.limits_source: LimitsSource | None = None
        self._limits: Sequence[LimitReading] = ()
        self._refreshers: dict[str, Refresher] = {}
        self._refreshed_at = -float("inf")
        self._lock = asyncio.Lock()
        r.register(_LimitsCollector(self))

    def add_refresher(self, name: str, refresher: Refresher) -> None:
        """Run `refresher` before a scrape (at most every refresh_s); `name` labels failures."""
        self._refreshers[name] = refresher

    async def refresh(self) -> None:
        """Bring the scrape-time readings up to date unless they are fresh enough."""
        async with self._lock:
            if time.monotonic() - self._refreshed_at < self.refresh_s:
                return
            sources = dict(self._refreshers)
            if self.limits_source is not None:
                sources["limits"] = self._read_limits
            for name, refresher in sources.items():
                try:
                    await refresher()
                except Exception as exc:  # a scrape must not fail because a backend is down
                    self.refresh_errors.labels(name).inc()
                    logger.warning("metrics: reading %s failed: %r", name, exc)
            self._refreshed_at = time.monotonic()

    async def _read_limits(self) -> None:
        assert self.limits_source is not None
        self._limits = list(await self.limits_source())

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

    # -- recording, called on the hot path: in-memory only ----------------------------------

    def attempt_finished(
        self,
        *,
        kind: str,
        outcome: str,
        status_code: int | None,
        error_code: str | None,
        retrying: bool,
    ) -> None:
        """Count one finished attempt (and the retry it scheduled)."""
        reason = attempt_reason(status_code, error_code)
        self.attempts.labels(kind, outcome, reason).inc()
        if retrying:
            self.retries.labels(reason).inc()

    def _model_label(self, model: str) -> str:
        """`model`, or OTHER_MODEL once MAX_MODEL_LABELS others have been seen (said once)."""
        if model in self._models:
            return model
        if len(self._models) < MAX_MODEL_LABELS:
            self._models.add(model)
            return model
        if not self._models_capped:
            self._models_capped = True
            logger.warning(
                "metrics: more than %d models called; further ones are labelled %r",
                MAX_MODEL_LABELS,
                OTHER_MODEL,
            )
        return OTHER_MODEL

    def llm_call(
        self,
        *,
        model: str,
        endpoint: str,
        outcome: str,
        duration_s: float,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> None:
        """Record one call to the model endpoint."""
        model = self._model_label(model)
        self.llm_latency.labels(model, endpoint, outcome).observe(duration_s)
        if prompt_tokens:
            self.tokens.labels(model, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(model, "completion").inc(completion_tokens)


class _LimitsCollector(Collector):
    """Serves the last limiter reading (taken by Metrics.refresh) as Prometheus families."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return list(self._families(()))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self._metrics._limits))

    @staticmethod
    def _families(readings: Sequence[LimitReading]) -> Iterator[Metric]:
        waits = CounterMetricFamily(
            "promptq_limiter_waits", "Requests that waited for a global limit.", labels=["limit"]
        )
        waited = CounterMetricFamily(
            "promptq_limiter_wait_seconds",
            "Seconds requests spent waiting for a global limit.",
            labels=["limit"],
        )
        in_flight = GaugeMetricFamily(
            "promptq_limit_in_flight",
            "Requests holding a slot of a global limit, across workers.",
            labels=["limit"],
        )
        current = GaugeMetricFamily(
            "promptq_adaptive_limit", "The current value of an adaptive limit.", labels=["limit"]
        )
        for reading in readings:
            if reading.waits_total is not None:
                waits.add_metric([reading.name], reading.waits_total)
            if reading.wait_seconds_total is not None:
                waited.add_metric([reading.name], reading.wait_seconds_total)
            if reading.in_flight is not None:
                in_flight.add_metric([reading.name], reading.in_flight)
            if reading.limit is not None:
                current.add_metric([reading.name], reading.limit)
        yield from (waits, waited, in_flight, current)


def jobs_by_status_refresher(
    metrics: Metrics, sessionmaker: async_sessionmaker[AsyncSession]
) -> Refresher:
    """Reads `SELECT status, count(*) FROM jobs GROUP BY status` into `promptq_jobs`."""

    async def refresh() -> None:
        async with sessionmaker() as session:
            rows = (
                await session.execute(select(Job.status, func.count()).group_by(Job.status))
            ).all()
        counts = {str(status): int(count) for status, count in rows}
        for known in JobStatus:
            metrics.jobs.labels(known.value).set(counts.pop(known.value, 0))
        for other, count in counts.items():  # a status this version does not know
            metrics.jobs.labels(other).set(count)

    return refresh


def queue_depth_refresher(metrics: Metrics, redis: Redis, queue_name: str) -> Refresher:
    """Reads the arq queue's length (`ZCARD`) into `promptq_queue_depth`."""

    async def refresh() -> None:
        metrics.queue_depth.set(await redis.zcard(queue_name))

    return refresh


METRICS = web.AppKey("metrics", Metrics)


async def metrics_handler(request: web.Request) -> web.Response:
    """`GET /metrics`: refresh the scrape-time readings, then serve the registry."""
    metrics = request.app[METRICS]
    await metrics.refresh()
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_app(metrics: Metrics) -> web.Application:
    """A tiny app serving only `/metrics` (a worker's `--metrics-port`)."""
    app = web.Application()
    app[METRICS] = metrics
    app.router.add_get("/metrics", metrics_handler)
    return app
