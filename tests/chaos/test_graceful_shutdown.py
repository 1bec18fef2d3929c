"""SIGTERM a worker while it runs jobs.

Given a `promptq worker` with jobs in flight, when it gets SIGTERM, then it takes no new job,
hands its prefetched jobs (claimed, waiting for a model slot) back at once, uncharged, and
either (long grace) lets the in-flight ones finish, or (short grace) cancels them and hands
them back as interrupted, uncharged, for another worker to finish; either way it exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import pytest

from promptq.models import AttemptOutcome, Job, JobStatus
from promptq.schemas import PromptJobCreate
from promptq.service import JobService
from promptq.testing.fake_llm import FakeLLM, expected_reply
from tests.chaos.conftest import running_attempts, worker_name
from tests.conftest import wait_for, wait_terminal
from tests.e2e.conftest import Procs

pytestmark = pytest.mark.chaos

IN_FLIGHT = 3


def prompt(content: str, max_attempts: int = 5) -> PromptJobCreate:
    """A prompt job request."""
    return PromptJobCreate.model_validate(
        {
            "kind": "prompt",
            "messages": [{"role": "user", "content": content}],
            "max_attempts": max_attempts,
        }
    )


async def sigterm_when_busy(
    service: JobService, procs: Procs, worker: subprocess.Popen[bytes], attempts: int = IN_FLIGHT
) -> float:
    """Wait until the worker runs `attempts` attempts, SIGTERM it; return when it was sent."""

    async def busy() -> bool:
        return await running_attempts(service, worker_name(worker)) == attempts

    await wait_for(busy, timeout_s=20, interval_s=0.05)
    worker.send_signal(signal.SIGTERM)
    return time.monotonic()


async def assert_answered(service: JobService, content: str, job_id: str) -> Job:
    """The job succeeded with the fake model's answer to `content`; its row."""
    row = await service.store.get_job(job_id)
    assert row is not None, f"no job {job_id}"
    assert row.status == JobStatus.SUCCEEDED, row.error
    assert row.result == expected_reply("fake-small", [{"role": "user", "content": content}])
    return row


async def exit_code(procs: Procs, worker: subprocess.Popen[bytes], timeout_s: float) -> int:
    """The worker's exit code, waited for off the event loop (the fake LLM runs on it)."""
    try:
        return await asyncio.to_thread(worker.wait, timeout_s)
    except subprocess.TimeoutExpired:
        print(procs.logs())
        raise


@pytest.mark.timeout(60)
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_with_a_long_grace_in_flight_jobs_finish_and_no_new_job_starts(
    chaos_service: JobService, chaos_procs: Procs, fake_llm: FakeLLM
) -> None:
    slow = [f"finish me {i} [[fake: sleep:1500, ok]]" for i in range(IN_FLIGHT)]
    jobs = [(await chaos_service.submit(prompt(c)))[0] for c in slow]
    worker = chaos_procs.start(
        "worker", "--concurrency", str(IN_FLIGHT), "--grace-s", "30", name="worker"
    )

    async def slots_busy() -> bool:
        return fake_llm.stats.in_flight == IN_FLIGHT

    await wait_for(slots_busy, timeout_s=20)
    # Two more jobs come while the slow ones hold the model slots: the worker prefetches them
    # (the default prefetch is half the concurrency, rounded up: 2), claimed, waiting for a slot
    waiting = [(await chaos_service.submit(prompt(f"not yet {i}")))[0] for i in range(2)]
    sent = await sigterm_when_busy(chaos_service, chaos_procs, worker, attempts=IN_FLIGHT + 2)
    assert await exit_code(chaos_procs, worker, 20) == 0, chaos_procs.logs()
    assert time.monotonic() - sent < 10

    for content, job in zip(slow, jobs, strict=True):
        row = await assert_answered(chaos_service, content, job.id)
        assert (row.attempts, row.interruptions) == (1, 0)
    for job in waiting:  # handed back at the signal, uncharged, without reaching the model
        row = await chaos_service.store.get_job(job.id)
        assert row is not None and (row.status, row.attempts, row.interruptions) == (
            JobStatus.QUEUED,
            1,
            1,
        )
        (attempt,) = await chaos_service.store.list_attempts(job.id)
        assert attempt.outcome == AttemptOutcome.INTERRUPTED
        assert job.input["messages"][0]["content"] not in fake_llm.stats.requests_by_prompt

    chaos_procs.start("worker", name="next-worker")
    await wait_terminal(chaos_service.store, [j.id for j in waiting], timeout_s=20)


@pytest.mark.timeout(60)
async def test_with_a_short_grace_in_flight_jobs_are_handed_back_uncharged(
    chaos_service: JobService, chaos_procs: Procs, fake_llm: FakeLLM
) -> None:
    # One charged attempt each: if the interrupted attempt were charged, no second could run.
    slow = [f"hand me back {i} [[fake: sleep:30000, ok]]" for i in range(IN_FLIGHT)]
    jobs = [(await chaos_service.submit(prompt(c, max_attempts=1)))[0] for c in slow]
    worker = chaos_procs.start(
        "worker", "--concurrency", str(IN_FLIGHT), "--grace-s", "0.5", name="worker"
    )

    sent = await sigterm_when_busy(chaos_service, chaos_procs, worker)
    assert await exit_code(chaos_procs, worker, 20) == 0, chaos_procs.logs()
    assert time.monotonic() - sent < 8

    for job in jobs:
        row = await chaos_service.store.get_job(job.id)
        assert row is not None
        assert (row.status, row.attempts, row.interruptions) == (JobStatus.QUEUED, 1, 1)
        (attempt,) = await chaos_service.store.list_attempts(job.id)
        assert attempt.outcome == AttemptOutcome.INTERRUPTED and attempt.finished_at
        assert attempt.error and "worker stopped" in attempt.error

    chaos_procs.start("worker", name="next-worker")
    await wait_terminal(chaos_service.store, [j.id for j in jobs], timeout_s=20)
    for content, job in zip(slow, jobs, strict=True):
        row = await assert_answered(chaos_service, content, job.id)
        assert (row.attempts, row.interruptions, row.max_attempts) == (2, 1, 1)
        outcomes = [a.outcome for a in await chaos_service.store.list_attempts(job.id)]
        assert outcomes == [AttemptOutcome.INTERRUPTED, AttemptOutcome.SUCCEEDED]
        assert fake_llm.stats.requests_by_prompt[content] == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_second_signal_stops_at_once(
    chaos_service: JobService, chaos_procs: Procs, fake_llm: FakeLLM
) -> None:
    slow = [f"impatient {i} [[fake: sleep:30000, ok]]" for i in range(IN_FLIGHT)]
    jobs = [(await chaos_service.submit(prompt(c)))[0] for c in slow]
    worker = chaos_procs.start(
        "worker", "--concurrency", str(IN_FLIGHT), "--grace-s", "60", name="worker"
    )

    await sigterm_when_busy(chaos_service, chaos_procs, worker)
    worker.send_signal(signal.SIGINT)  # Ctrl-C again: don't wait out the grace period
    sent = time.monotonic()
    assert await exit_code(chaos_procs, worker, 20) == 0, chaos_procs.logs()
    assert time.monotonic() - sent < 8

    for job in jobs:
        row = await chaos_service.store.get_job(job.id)
        assert row is not None
        assert (row.status, row.attempts, row.interruptions) == (JobStatus.QUEUED, 1, 1)
