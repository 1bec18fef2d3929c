"""Prometheus metrics of the API (`/metrics`) and of a worker (`--metrics-port`).

Given jobs submitted to a real API and run by a real in-process worker against the fake LLM,
when Prometheus scrapes before and after, then every series is exposed and moves by exactly
what the jobs did: statuses, queue depth, attempts and retries by reason, calls and tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from promptq.metrics import LimitReading
from promptq.models import JobStatus
from promptq.schemas import PromptJobCreate
from promptq.service import JobService
from promptq.settings import Settings
from promptq.testing.fake_llm import FakeLLM
from tests.conftest import ApiStarter, WorkerFactory, wait_terminal

#: For tests where the database plays no part (the job series are tested on both).
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by (name, labels)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


async def scrape(url: str) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(await response.text())


def prompt(content: str) -> PromptJobCreate:
    body = {"kind": "prompt", "messages": [{"role": "user", "content": content}]}
    return PromptJobCreate.model_validate(body)


async def submit(service: JobService, contents: Iterable[str]) -> list[str]:
    return [(await service.submit(prompt(c)))[0].id for c in contents]


async def test_metrics_expose_every_series_and_move_when_jobs_run(
    settings: Settings,
    service: JobService,
    start_api: ApiStarter,
    start_worker: WorkerFactory,
    fake_llm: FakeLLM,
) -> None:
    api = await start_api(metrics_refresh_s=0)
    api_url = str(api.make_url("/metrics"))
    before = await scrape(api_url)  # no key: /metrics is open like /healthz
    contents = ["plain one", "plain two", "[[fake: 500, ok]] flaky", "[[fake: 400]] refused"]
    ids = await submit(service, contents)

    queued = await scrape(api_url)
    assert value(queued, "promptq_queue_depth") == len(ids)
    queued_before = value(before, "promptq_jobs", status="queued")
    assert value(queued, "promptq_jobs", status="queued") == queued_before + len(ids)

    worker = await start_worker(worker_metrics_port=0, metrics_refresh_s=0)
    await wait_terminal(service.store, ids)
    worker_url = f"http://127.0.0.1:{worker.ctx['_observability'].metrics_port}/metrics"
    after_api, after_worker = await scrape(api_url), await scrape(worker_url)

    jobs = [await service.store.get_job(i) for i in ids]
    succeeded = sum(j is not None and j.status == JobStatus.SUCCEEDED for j in jobs)
    failed = sum(j is not None and j.status == JobStatus.FAILED for j in jobs)
    assert (succeeded, failed) == (3, 1)
    assert value(after_api, "promptq_jobs", status="succeeded") == succeeded
    assert value(after_api, "promptq_jobs", status="failed") == failed
    assert value(after_api, "promptq_jobs", status="queued") == 0
    # The jobs table is counted by the API alone: N workers scraped do not scan it N times
    assert "promptq_jobs" not in names(after_worker)
    for samples in (after_api, after_worker):
        assert value(samples, "promptq_queue_depth") == 0

    w = after_worker
    assert value(w, "promptq_attempts_total", outcome="succeeded", reason="none") == 3
    assert value(w, "promptq_attempts_total", outcome="transient_error", reason="http_500") == 1
    assert value(w, "promptq_attempts_total", outcome="permanent_error", reason="http_400") == 1
    assert (
        value(w, "promptq_retries_total")
        == 1
        == value(w, "promptq_retries_total", reason="http_500")
    )
    calls = value(w, "promptq_llm_request_duration_seconds_count", model="fake-small")
    assert calls == fake_llm.stats.total_requests == 5
    ok_calls = value(w, "promptq_llm_request_duration_seconds_count", outcome="ok")
    assert ok_calls == 3
    rows = [j for j in jobs if j is not None]
    assert value(w, "promptq_llm_tokens_total", type="prompt") == sum(
        j.prompt_tokens or 0 for j in rows
    )
    assert value(w, "promptq_llm_tokens_total", type="completion") == sum(
        j.completion_tokens or 0 for j in rows
    )
    assert value(w, "promptq_llm_requests_in_flight") == 0
    assert value(w, "promptq_worker_jobs_running") == 0
    assert value(w, "promptq_worker_concurrency") == settings.worker_concurrency


@SQLITE_ONLY
async def test_limiter_readings_are_exported(start_api: ApiStarter) -> None:
    """The global limiter plugs in through `Metrics.limits_source` (read at scrape time)."""
    from promptq.metrics import METRICS

    api = await start_api(metrics_refresh_s=0)
    readings: list[LimitReading] = []

    async def source() -> list[LimitReading]:
        return list(readings)

    api.app[METRICS].limits_source = source
    url = str(api.make_url("/metrics"))
    assert value(await scrape(url), "promptq_adaptive_limit") == 0

    readings[:] = [
        LimitReading(
            "model:fake-small", in_flight=3, limit=8, waits_total=5, wait_seconds_total=1.5
        )
    ]
    samples = await scrape(url)
    labels: dict[str, Any] = {"limit": "model:fake-small"}
    assert value(samples, "promptq_limit_in_flight", **labels) == 3
    assert value(samples, "promptq_adaptive_limit", **labels) == 8
    assert value(samples, "promptq_limiter_waits_total", **labels) == 5
    assert value(samples, "promptq_limiter_wait_seconds_total", **labels) == 1.5


@SQLITE_ONLY
async def test_a_failing_reading_still_serves_the_rest(start_api: ApiStarter) -> None:
    from promptq.metrics import METRICS

    api = await start_api(metrics_refresh_s=0)

    async def broken() -> list[LimitReading]:
        raise ConnectionError("limiter unreachable")

    api.app[METRICS].limits_source = broken
    samples = await scrape(str(api.make_url("/metrics")))
    assert value(samples, "promptq_metrics_refresh_errors_total", source="limits") == 1
    assert "promptq_jobs" in names(samples)
