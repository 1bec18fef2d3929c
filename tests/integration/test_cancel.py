"""Cancelling jobs and batches, over the real API, Redis, database and an in-process worker.

Given the API and a worker that calls the fake LLM, when a client cancels a queued job, then the
model never sees it (the fake's counters prove it); when it cancels a running job, then the
worker aborts the attempt at once and records both the attempt and the job as cancelled; when
it cancels a batch midway, then finished jobs keep their results and the rest stop.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from promptq.cancel import Canceller
from promptq.models import AttemptOutcome, JobStatus
from promptq.service import JobService, parse_job_request
from promptq.testing.fake_llm import FakeLLM
from tests.conftest import ApiStarter, KeyFactory, WorkerFactory, bearer, wait_for, wait_terminal

Client = TestClient[web.Request, web.Application]
#: A prompt the fake answers after a long time the first time, at once the second.
SLOW_ONCE = "[[fake: sleep:60000, ok]] slow"


def prompt(content: str) -> dict[str, Any]:
    """A prompt job request with one user message."""
    return {"kind": "prompt", "messages": [{"role": "user", "content": content}]}


@pytest.fixture
async def api(start_api: ApiStarter, make_key: KeyFactory) -> Client:
    """An API client with an admin key."""
    return await start_api(bearer(await make_key("cancel-admin", admin=True)))


async def submit(api: Client, content: str) -> str:
    """POST a prompt job; its id."""
    async with api.post("/api/jobs", json=prompt(content)) as response:
        assert response.status == 202
        job_id: str = (await response.json())["id"]
        return job_id


async def job_status(service: JobService, job_id: str) -> str:
    """The job's status in SQL."""
    job = await service.store.get_job(job_id)
    assert job is not None
    return job.status


async def test_a_queued_job_cancelled_never_reaches_the_model(
    api: Client, service: JobService, fake_llm: FakeLLM, start_worker: WorkerFactory
) -> None:
    cancelled = await submit(api, "never run me")
    async with api.post(f"/api/jobs/{cancelled}/cancel") as response:
        assert response.status == 200
        body = await response.json()
    assert body["status"] == "cancelled" and body["error_code"] == "cancelled"
    # Its arq job is still queued; the worker must drop it when it comes up.
    assert await service.queue.redis.zscore(service.queue.queue_name, cancelled) is not None

    other = await submit(api, "run me")
    await start_worker()
    await wait_terminal(service.store, [other])

    async def queue_drained() -> bool:
        return bool(await service.queue.redis.zcard(service.queue.queue_name) == 0)

    await wait_for(queue_drained)
    assert fake_llm.stats.requests_by_prompt.get("run me") == 1
    assert "never run me" not in fake_llm.stats.requests_by_prompt
    assert fake_llm.stats.total_requests == 1
    job = await service.store.get_job(cancelled)
    assert job is not None and job.status == JobStatus.CANCELLED and job.attempts == 0

    async with api.post(f"/api/jobs/{cancelled}/cancel") as response:
        assert response.status == 409
        assert "cancelled" in (await response.json())["error"]["message"]
    async with api.post(f"/api/jobs/{other}/cancel") as response:
        assert response.status == 409
        error = (await response.json())["error"]
    assert error["code"] == "not_cancellable" and "succeeded" in error["message"]
    assert await job_status(service, other) == JobStatus.SUCCEEDED


async def test_a_running_job_is_aborted_and_recorded_then_retried(
    api: Client, service: JobService, fake_llm: FakeLLM, start_worker: WorkerFactory
) -> None:
    await start_worker()
    job_id = await submit(api, SLOW_ONCE)
    await fake_llm.wait_for_requests(1)
    assert await job_status(service, job_id) == JobStatus.RUNNING
    async with api.post(f"/api/jobs/{job_id}/cancel") as response:
        assert response.status in (200, 202)
    # Aborted well before the fake's 60 s answer.
    await wait_terminal(service.store, [job_id], timeout_s=10)
    job = await service.store.get_job(job_id)
    assert job is not None and job.status == JobStatus.CANCELLED and job.result is None
    (attempt,) = await service.store.list_attempts(job_id)
    assert attempt.outcome == AttemptOutcome.CANCELLED and attempt.finished_at is not None

    # `promptq retry` (here through the API) runs a cancelled job again, to completion.
    async with api.post(f"/api/jobs/{job_id}/retry") as response:
        assert response.status == 202
    await wait_terminal(service.store, [job_id])
    assert await job_status(service, job_id) == JobStatus.SUCCEEDED
    assert fake_llm.stats.requests_by_prompt[SLOW_ONCE] == 2


async def test_lease_renewal_aborts_when_the_message_is_lost(
    service: JobService, fake_llm: FakeLLM, start_worker: WorkerFactory
) -> None:
    await start_worker(lease_s=1.5)  # renewals every 0.5 s notice the flag
    job, _ = await service.submit(parse_job_request(prompt(SLOW_ONCE)))
    await fake_llm.wait_for_requests(1)
    # Flag it in SQL only, as if the pub/sub message never arrived.
    assert await Canceller(service)._request_running([job.id]) == [(job.id, 1)]
    await wait_terminal(service.store, [job.id], timeout_s=10)
    assert await job_status(service, job.id) == JobStatus.CANCELLED


async def test_cancel_a_batch_midway_keeps_finished_results(
    api: Client, service: JobService, fake_llm: FakeLLM, start_worker: WorkerFactory
) -> None:
    slow = [f"[[fake: sleep:60000]] slow {i}" for i in range(2)]
    fast = [f"fast {i}" for i in range(6)]
    body = {"jobs": [prompt(text) for text in fast[:3] + slow + fast[3:]]}
    async with api.post("/api/batches", json=body) as response:
        batch_id = (await response.json())["id"]
    await start_worker(worker_concurrency=2)

    async def both_slow_running() -> bool:
        return all(text in fake_llm.stats.requests_by_prompt for text in slow)

    # Both slots end up stuck on the slow items; the fast ones before them have finished.
    await wait_for(both_slow_running)
    async with api.post(f"/api/batches/{batch_id}/cancel") as response:
        assert response.status in (200, 202)
        assert (await response.json())["status"] in ("cancelling", "cancelled")

    batch: dict[str, Any] = {}

    async def settled() -> bool:
        async with api.get(f"/api/batches/{batch_id}") as r:
            batch.update(await r.json())
        return bool(batch["status"] == "cancelled")

    await wait_for(settled, timeout_s=10)
    answered = [text for text in fast if text in fake_llm.stats.requests_by_prompt]
    counts = batch["counts"]
    assert counts["succeeded"] == len(answered)
    assert counts["cancelled"] == len(fast) + len(slow) - len(answered)
    assert counts["queued"] == counts["running"] == counts["retrying"] == counts["failed"] == 0
    assert batch["cancelled_at"] is not None

    async with api.get(f"/api/batches/{batch_id}/results") as response:
        lines = [orjson.loads(line) for line in (await response.read()).splitlines()]
    assert len(lines) == len(fast) + len(slow)
    for line in lines:
        if line["status"] == "succeeded":
            assert line["result"]  # finished results are kept
        else:
            assert line["status"] == "cancelled"
    for job_id in [line["job_id"] for line in lines if line["attempts"]]:
        attempts = await service.store.list_attempts(job_id)
        assert attempts[-1].outcome in (AttemptOutcome.SUCCEEDED, AttemptOutcome.CANCELLED)
    # The attempts cancelled at the model are the slow ones; any other cancelled attempt was a
    # prefetched job's, waiting for a model slot (worker.slots), and never reached the model.
    cancelled_attempts = {
        line["job_id"] for line in lines if line["attempts"] and line["status"] == "cancelled"
    }
    reached_model = {
        job_id
        for job_id in cancelled_attempts
        if (await service.store.get_job(job_id)).input["messages"][0]["content"]  # type: ignore[union-attr]
        in fake_llm.stats.requests_by_prompt
    }
    assert len(reached_model) == len(slow)
    assert len(cancelled_attempts - reached_model) <= 1  # the prefetch of 2 slots is 1
    async with api.post(f"/api/batches/{batch_id}/cancel") as response:
        assert response.status == 409


async def test_cancel_is_private_and_checks_ids(
    start_api: ApiStarter, make_key: KeyFactory, service: JobService
) -> None:
    alice = await start_api(bearer(await make_key("alice")))
    bob = await start_api(bearer(await make_key("bob")))
    job_id = await submit(alice, "mine")
    async with bob.post(f"/api/jobs/{job_id}/cancel") as response:
        assert response.status == 404
    assert await job_status(service, job_id) == JobStatus.QUEUED
    for bad in ("nope", "00000000-0000-0000-0000-000000000000"):
        async with alice.post(f"/api/jobs/{bad}/cancel") as response:
            assert response.status == 404
        async with alice.post(f"/api/batches/{bad}/cancel") as response:
            assert response.status == 404
    async with alice.post(f"/api/jobs/{job_id}/cancel") as response:
        assert response.status == 200
