"""A worker's observability: metered LLM calls, attempt counters, metrics server, heartbeat.

Everything recorded per job or per call stays in memory (prometheus-client counters), so it
costs no database or Redis round trip; Redis (the queue's length, the limiter) is read only
when Prometheus scrapes. The jobs table is counted by the API alone (api.metrics).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import Gauge

from promptq.errors import LLMError, PromptQError
from promptq.metrics import (
    Metrics,
    endpoint_label,
    metrics_app,
    queue_depth_refresher,
)
from promptq.settings import Settings
from promptq.store import AttemptResult, Claim
from worker.heartbeat import Heartbeat, heartbeat_key
from worker.llm import Completion, LLMClient

logger = logging.getLogger(__name__)


class MeteredLLMClient(LLMClient):
    """LLMClient that records each call's latency, outcome and tokens in `metrics`."""

    def __init__(self, session: aiohttp.ClientSession, *, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(session, **kwargs)
        self.metrics = metrics
        self.endpoint = endpoint_label(kwargs["base_url"])
        self._in_flight = metrics.llm_in_flight.labels(self.endpoint)

    async def chat(self, model: str, *args: Any, **kwargs: Any) -> Completion:
        """LLMClient.chat, metered."""
        return await self._metered(model, super().chat(model, *args, **kwargs))

    async def chat_stream(self, model: str, *args: Any, **kwargs: Any) -> Completion:
        """LLMClient.chat_stream, metered."""
        return await self._metered(model, super().chat_stream(model, *args, **kwargs))

    async def _metered(self, model: str, call: Awaitable[Completion]) -> Completion:
        started = time.perf_counter()
        self._in_flight.inc()
        outcome = "error"
        completion: Completion | None = None
        try:
            completion = await call
            outcome = "ok"
            return completion
        except LLMError as exc:
            outcome = f"http_{exc.status_code}" if exc.status_code else exc.code
            raise
        finally:
            self._in_flight.dec()
            self.metrics.llm_call(
                model=model,
                endpoint=self.endpoint,
                outcome=outcome,
                duration_s=time.perf_counter() - started,
                prompt_tokens=completion.prompt_tokens if completion else None,
                completion_tokens=completion.completion_tokens if completion else None,
            )


def record_attempt(ctx: Any, claim: Claim, result: AttemptResult, *, retrying: bool) -> None:
    """Count a finished attempt in the worker's metrics (if it has any)."""
    metrics: Metrics | None = ctx.get("metrics")
    if metrics is not None:
        metrics.attempt_finished(
            kind=str(claim.kind),
            outcome=str(result.outcome),
            status_code=result.status_code,
            error_code=result.error_code,
            retrying=retrying,
        )


class Observability:
    """A worker's metrics endpoint and heartbeat, started and stopped with the worker."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.heartbeat: Heartbeat | None = None
        self._runner: web.AppRunner | None = None
        #: The port `/metrics` is served on (known after start; the setting may be 0).
        self.metrics_port: int | None = None

    async def start(self, ctx: dict[str, Any], slots: Callable[[], tuple[int, int]]) -> None:
        """Start the heartbeat, and the metrics server if a port is configured.

        `slots()` answers (jobs running, concurrency) for this worker.
        """
        settings, metrics = self.settings, self.metrics
        redis = ctx["redis"]
        metrics.add_refresher("queue", queue_depth_refresher(metrics, redis, settings.queue_name))
        _slot_gauges(metrics, slots)

        def info() -> dict[str, Any]:
            busy, total = slots()
            return {"running": busy, "concurrency": total}

        self.heartbeat = Heartbeat(
            redis,
            heartbeat_key(settings.queue_name, ctx["worker_name"]),
            interval_s=settings.worker_heartbeat_s,
            info=info,
        )
        await self.heartbeat.beat()  # healthy as soon as it has started
        self.heartbeat.start()
        if settings.worker_metrics_port is None:
            return
        self._runner = web.AppRunner(metrics_app(metrics), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, settings.worker_metrics_host, settings.worker_metrics_port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise PromptQError(
                f"cannot serve metrics on {settings.worker_metrics_host}:"
                f"{settings.worker_metrics_port} ({exc.strerror}); pick another --metrics-port"
            ) from exc
        self.metrics_port = int(self._runner.addresses[0][1])
        logger.info(
            "worker metrics on http://%s:%d/metrics",
            settings.worker_metrics_host,
            self.metrics_port,
        )

    async def stop(self) -> None:
        """Stop the heartbeat (deleting its key) and the metrics server."""
        if self.heartbeat is not None:
            await self.heartbeat.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _slot_gauges(metrics: Metrics, slots: Callable[[], tuple[int, int]]) -> None:
    """`promptq_worker_jobs_running` and `promptq_worker_concurrency`, read at scrape time."""
    running = Gauge(
        "promptq_worker_jobs_running", "Jobs this worker runs right now.", registry=metrics.registry
    )
    total = Gauge(
        "promptq_worker_concurrency", "Jobs this worker may run at once.", registry=metrics.registry
    )
    running.set_function(lambda: slots()[0])
    total.set_function(lambda: slots()[1])
