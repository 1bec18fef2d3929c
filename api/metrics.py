"""`GET /metrics` on the API: Prometheus metrics, open like /healthz (counts only, no content).

The API's registry holds what the API can see: jobs by status (SQL) and the queue's depth
(Redis), read at scrape time (cached for `metrics_refresh_s`). Per-call and per-attempt series
(latency, tokens, retries) and the global limiter's state live in each worker's registry:
scrape the workers' `--metrics-port` for those.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from api import openapi
from api.state import SERVICE
from promptq.metrics import (
    METRICS,
    Metrics,
    jobs_by_status_refresher,
    metrics_handler,
    queue_depth_refresher,
)
from promptq.settings import Settings

#: The path Prometheus scrapes (listed in api.auth.PUBLIC_PATHS).
METRICS_PATH = "/metrics"


def setup_metrics(app: web.Application, settings: Settings) -> Metrics:
    """Give the app its own Metrics registry and serve it on /metrics."""
    metrics = Metrics(refresh_s=settings.metrics_refresh_s)
    app[METRICS] = metrics

    async def jobs() -> None:
        await jobs_by_status_refresher(metrics, app[SERVICE].store.sessionmaker)()

    async def queue() -> None:
        service = app[SERVICE]
        await queue_depth_refresher(metrics, service.queue.redis, settings.queue_name)()

    metrics.add_refresher("jobs", jobs)
    metrics.add_refresher("queue", queue)
    document = openapi.operation(
        responses={200: openapi.Content(CONTENT_TYPE_LATEST.split(";")[0])},
        summary="Prometheus metrics: jobs by status and queue depth",
        public=True,
        tags=("health",),
    )
    app.router.add_get(METRICS_PATH, document(metrics_handler))
    return metrics
