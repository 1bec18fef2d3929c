"""The core pipeline on real Redis and a real database (SQLite and PostgreSQL), with the fake LLM.

Given jobs submitted through the JobService, when an in-process arq worker runs them, then each
reaches the right terminal state with exactly as many attempts as the fake server saw requests.
"""

from __future__ import annotations

from typing import Any

import pytest

from promptq.models import AttemptOutcome, JobStatus
from promptq.schemas import PromptJobCreate, SummarizeJobCreate
from promptq.service import JobService
from promptq.testing.fake_llm import FakeLLM, expected_reply
from tests.conftest import WorkerFactory, wait_for, wait_terminal


def prompt(content: str, **extra: Any) -> PromptJobCreate:
    """A prompt job request with one user message."""
    body = {"kind": "prompt", "messages": [{"role": "user", "content": content}], **extra}
    return PromptJobCreate.model_validate(body)


async def run_all(
    service: JobService, start_worker: WorkerFactory, requests: list[Any], **worker_overrides: Any
) -> list[Any]:
    """Submit, run a worker, and return the finished job rows."""
    jobs = [(await service.submit(r))[0] for r in requests]
    await start_worker(**worker_overrides)
    await wait_terminal(service.store, [j.id for j in jobs])
    return [await service.store.get_job(j.id) for j in jobs]


async def test_prompt_job_succeeds_with_its_own_result(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    requests = [prompt(f"welcome message for user {i}") for i in range(25)]
    jobs = await run_all(service, start_worker, requests)

    for request, job in zip(requests, jobs, strict=True):
        messages = [m.model_dump() for m in request.messages]
        assert job.status == JobStatus.SUCCEEDED
        assert job.result == expected_reply("fake-small", messages)
        assert job.attempts == 1 == fake_llm.stats.requests_by_prompt[messages[0]["content"]]
        assert job.prompt_tokens and job.prompt_tokens > 0
        assert job.completion_tokens and job.completion_tokens > 0
        assert job.started_at <= job.finished_at
        attempts = await service.store.list_attempts(job.id)
        assert [(a.number, a.outcome, a.status_code) for a in attempts] == [
            (1, AttemptOutcome.SUCCEEDED, 200)
        ]
        assert attempts[0].latency_ms is not None and attempts[0].worker


async def test_summarize_job_sends_document_and_instructions(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    request = SummarizeJobCreate(
        kind="summarize", document="Alpha beta gamma. " * 50, instructions="Three bullets."
    )
    (job,) = await run_all(service, start_worker, [request])

    assert job.status == JobStatus.SUCCEEDED
    assert job.kind == "summarize"
    assert fake_llm.stats.total_requests == 1
    (sent_prompt,) = fake_llm.stats.requests_by_prompt
    assert sent_prompt.startswith("Three bullets.") and "Alpha beta gamma." in sent_prompt
    assert job.result and job.result.startswith("[fake-small] reply")


@pytest.mark.parametrize(
    ("script", "expected_codes"),
    [
        ("500, 429:retry_after=0.05, 408, ok", [500, 429, 408, 200]),
        ("502, 503, 504, 409, ok", [502, 503, 504, 409, 200]),
        ("malformed, empty, nochoices, ok", [200, 200, 200, 200]),
        ("drop, ok", [None, 200]),
        ("hang, ok", [None, 200]),
    ],
)
async def test_transient_failures_are_retried_until_success(
    service: JobService,
    start_worker: WorkerFactory,
    fake_llm: FakeLLM,
    script: str,
    expected_codes: list[int | None],
) -> None:
    content = f"transient please [[fake: {script}]]"
    (job,) = await run_all(service, start_worker, [prompt(content)], llm_timeout_s=0.5)

    attempts = await service.store.list_attempts(job.id)
    assert job.status == JobStatus.SUCCEEDED
    assert job.attempts == len(expected_codes) == fake_llm.stats.requests_by_prompt[content]
    assert [a.status_code for a in attempts] == expected_codes
    assert [a.outcome for a in attempts] == [AttemptOutcome.TRANSIENT_ERROR] * (
        len(expected_codes) - 1
    ) + [AttemptOutcome.SUCCEEDED]
    assert all(a.error for a in attempts[:-1])
    assert job.error is None


async def test_retry_after_is_honoured(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    content = "slow down [[fake: 429:retry_after=0.4, ok]]"
    (job,) = await run_all(service, start_worker, [prompt(content)])

    first, second = await service.store.list_attempts(job.id)
    assert job.status == JobStatus.SUCCEEDED
    assert first.status_code == 429
    assert first.finished_at is not None
    # The backoff cap is 0.05 s here, so only the server's Retry-After explains this gap.
    assert (second.started_at - first.finished_at).total_seconds() >= 0.4


@pytest.mark.parametrize("step", ["400", "401", "403", "404", "422", "context"])
async def test_permanent_errors_fail_after_one_attempt(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM, step: str
) -> None:
    content = f"never works [[fake: {step}, ok]]"
    (job,) = await run_all(service, start_worker, [prompt(content)])

    assert job.status == JobStatus.FAILED
    assert job.attempts == 1 == fake_llm.stats.requests_by_prompt[content]
    assert job.error_code == "llm_permanent"
    expected_status = "400" if step == "context" else step
    assert f"HTTP {expected_status}" in job.error
    (attempt,) = await service.store.list_attempts(job.id)
    assert attempt.outcome == AttemptOutcome.PERMANENT_ERROR


async def test_exhausted_attempts_keep_the_last_real_error(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    content = "always down [[fake: 500, 502, 503]]"
    (job,) = await run_all(service, start_worker, [prompt(content, max_attempts=4)])

    attempts = await service.store.list_attempts(job.id)
    assert job.status == JobStatus.FAILED
    assert job.attempts == 4 == fake_llm.stats.requests_by_prompt[content]
    assert [a.status_code for a in attempts] == [500, 502, 503, 503]
    assert job.error == attempts[-1].error and "HTTP 503" in job.error
    assert job.error_code == "llm_transient"
    assert job.finished_at is not None


async def test_concurrency_is_bounded_per_worker(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    fake_llm.config.latency_ms = 40
    jobs = await run_all(
        service,
        start_worker,
        [prompt(f"bounded {i}") for i in range(24)],
        worker_concurrency=4,
    )

    assert all(j.status == JobStatus.SUCCEEDED for j in jobs)
    assert fake_llm.stats.total_requests == 24
    assert 1 < fake_llm.stats.peak_in_flight <= 4


async def test_api_key_is_sent_as_bearer_and_never_stored(
    service: JobService,
    start_worker: WorkerFactory,
    fake_llm: FakeLLM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "sk-test-SECRET-0123456789"
    caplog.set_level("DEBUG")
    jobs = await run_all(
        service,
        start_worker,
        [prompt("key check"), prompt("key check fails [[fake: 401]]")],
        llm_api_key=secret,
    )

    assert fake_llm.stats.authorization_headers == {f"Bearer {secret}"}
    assert [j.status for j in jobs] == [JobStatus.SUCCEEDED, JobStatus.FAILED]
    for job in jobs:
        attempts = await service.store.list_attempts(job.id)
        stored = repr(vars(job)) + repr([vars(a) for a in attempts])
        assert secret not in stored
    assert secret not in caplog.text


async def test_redelivery_of_a_finished_job_changes_nothing(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    (job,) = await run_all(service, start_worker, [prompt("deliver twice")])
    assert job.status == JobStatus.SUCCEEDED

    # arq is at-least-once: deliver the same job id again after it finished.
    await service.queue.enqueue(job.id)
    await fake_llm.wait_for_requests(1)
    await wait_terminal(service.store, [job.id])
    await _wait_queue_empty(service)

    again = await service.store.get_job(job.id)
    assert again.attempts == 1
    assert again.result == job.result
    assert fake_llm.stats.total_requests == 1
    assert len(await service.store.list_attempts(job.id)) == 1


async def _wait_queue_empty(service: JobService) -> None:
    async def empty() -> bool:
        return not await service.queue.redis.zcard(service.queue.queue_name)

    await wait_for(empty, timeout_s=10)
