"""Slot refill and wake-ups (worker.fastpoll), on SQLite and PostgreSQL.

Every test runs a worker whose fallback poll is 60 s and which has no cron jobs, so nothing
but a wake-up (an enqueue's message, a freed slot, a deferred job falling due) can make it
poll again. Each test waits far less than 60 s, so a pass proves which path delivered the job.
These tests check the mechanism, never the speed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError

from promptq.models import AttemptOutcome, JobStatus
from promptq.schemas import PromptJobCreate
from promptq.service import JobService
from promptq.settings import Settings
from promptq.testing.fake_llm import FakeLLM
from tests.conftest import wait_for, wait_terminal
from worker.app import create_worker
from worker.fastpoll import FastPollWorker

#: Far longer than any wait below: a job that needed a poll would time the test out.
NO_POLL_S = 60.0
#: How long a test waits for what a wake-up should deliver (well below NO_POLL_S).
WAIT_S = 15.0

IdleWorkerFactory = Callable[..., Awaitable[FastPollWorker]]


def prompt(content: str) -> PromptJobCreate:
    """A prompt job request with one user message."""
    return PromptJobCreate.model_validate(
        {"kind": "prompt", "messages": [{"role": "user", "content": content}]}
    )


@pytest.fixture
async def start_idle_worker(settings: Settings) -> AsyncIterator[IdleWorkerFactory]:
    """Start a worker that polls only every 60 s and has no cron; returns after its first poll."""
    running: list[tuple[FastPollWorker, asyncio.Task[None]]] = []

    async def start(**overrides: Any) -> FastPollWorker:
        worker_settings = settings.with_overrides(worker_poll_delay_s=NO_POLL_S, **overrides)
        worker = create_worker(worker_settings, handle_signals=False)
        assert isinstance(worker, FastPollWorker)
        worker.cron_jobs = []  # a cron tick would poll too, and could hide a missing wake-up
        task = asyncio.create_task(worker.async_run())
        running.append((worker, task))

        async def first_poll_done() -> bool:
            if task.done():
                task.result()
            # The first poll ends with a heartbeat, which writes the health-check key.
            return worker._pool is not None and bool(
                await worker.pool.exists(worker.health_check_key)
            )

        await wait_for(first_poll_done, timeout_s=10)
        return worker

    yield start
    for worker, task in running:
        try:
            await worker.close()
        finally:  # never leave a worker running into the next test
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_enqueue_wakes_an_idle_worker(
    service: JobService, start_idle_worker: IdleWorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a worker that has polled once and found nothing
    await start_idle_worker()

    # When a job is submitted
    job, _ = await service.submit(prompt("wake up"))

    # Then it runs long before the next poll would have found it
    await wait_terminal(service.store, [job.id], timeout_s=WAIT_S)
    done = await service.store.get_job(job.id)
    assert done is not None and done.status == JobStatus.SUCCEEDED
    assert fake_llm.stats.total_requests == 1


async def test_a_freed_slot_is_refilled_without_a_poll(
    service: JobService, start_idle_worker: IdleWorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given six slow jobs queued before a worker with two slots starts: its first poll takes
    # two, and no enqueue happens after that
    fake_llm.config.latency_ms = 100
    jobs = [(await service.submit(prompt(f"refill {i}")))[0] for i in range(6)]

    # When the worker runs
    await start_idle_worker(worker_concurrency=2)

    # Then each finished job's slot took the next one: all six ran, never more than two at once
    await wait_terminal(service.store, [j.id for j in jobs], timeout_s=WAIT_S)
    for job in jobs:
        done = await service.store.get_job(job.id)
        assert done is not None and done.status == JobStatus.SUCCEEDED
    assert fake_llm.stats.total_requests == 6
    assert fake_llm.stats.peak_in_flight == 2


async def test_a_deferred_retry_runs_when_due_without_a_poll(
    service: JobService, start_idle_worker: IdleWorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given an idle worker
    await start_idle_worker()

    # When a job fails once with a 500, so that its retry is deferred by the backoff
    job, _ = await service.submit(prompt("retry me [[fake: 500, ok]]"))

    # Then the retry runs once it is due, not at the next poll
    await wait_terminal(service.store, [job.id], timeout_s=WAIT_S)
    attempts = await service.store.list_attempts(job.id)
    assert [(a.outcome, a.status_code) for a in attempts] == [
        (AttemptOutcome.TRANSIENT_ERROR, 500),
        (AttemptOutcome.SUCCEEDED, 200),
    ]


async def test_a_retry_due_at_once_runs_again_here_while_its_last_run_is_ending(
    service: JobService, start_idle_worker: IdleWorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given an idle worker that retries at once, and whose reconciler never runs during the
    # test (it would free a job's stale in-progress marker after some seconds)
    await start_idle_worker(retry_base_s=0, retry_cap_s=0, reconcile_interval_s=3600)

    # When jobs fail once with a 500: each goes back on the queue due now, and the worker's
    # claim takes it again while the run that put it back is still ending
    jobs = [(await service.submit(prompt(f"again {i} [[fake: 500, ok]]")))[0] for i in range(12)]

    # Then each runs again here, once, and succeeds
    await wait_terminal(service.store, [job.id for job in jobs], timeout_s=WAIT_S)
    for job in jobs:
        attempts = await service.store.list_attempts(job.id)
        assert [(a.outcome, a.status_code) for a in attempts] == [
            (AttemptOutcome.TRANSIENT_ERROR, 500),
            (AttemptOutcome.SUCCEEDED, 200),
        ]


async def test_a_job_deferred_by_the_producer_runs_when_due_without_a_poll(
    service: JobService, start_idle_worker: IdleWorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given an idle worker
    await start_idle_worker()

    # When a job is put on the queue to start a little later (as the reconciler does)
    job, _ = await service.store.create_job(
        kind="prompt",
        model="fake-small",
        input=prompt("later").job_input(),
        max_attempts=1,
        idempotency_key=None,
    )
    assert await service.queue.enqueue(job.id, defer_s=0.3)

    # Then it runs once due
    await wait_terminal(service.store, [job.id], timeout_s=WAIT_S)
    assert fake_llm.stats.total_requests == 1


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_a_job_recording_its_result_does_not_hold_back_the_prefetch(
    service: JobService,
    start_idle_worker: IdleWorkerFactory,
    settings: Settings,
    fake_llm: FakeLLM,
) -> None:
    # PostgreSQL only: a row lock is how this test keeps a job in its finishing phase.
    async def status(job_id: str) -> JobStatus:
        job = await service.store.get_job(job_id)
        assert job is not None
        return JobStatus(job.status)

    async def running(job_id: str) -> bool:
        return await status(job_id) == JobStatus.RUNNING

    async def at_the_model(text: str) -> bool:
        return text in fake_llm.stats.arrivals

    # Given a worker with one model slot and a prefetch of one, calling the model for a job
    # that takes a second and a half there
    first_text = "first [[fake: sleep:1500]]"
    first, _ = await service.submit(prompt(first_text))
    await start_idle_worker(worker_concurrency=1, worker_prefetch=1, llm_timeout_s=30)
    await wait_for(lambda: at_the_model(first_text), timeout_s=WAIT_S)

    # When its result cannot be written yet (its row is locked), and three more jobs come: the
    # second takes six seconds at the model
    dsn = settings.resolved_database_url.replace("postgresql+asyncpg://", "postgresql://")
    lock = await asyncpg.connect(dsn)
    try:
        locking = lock.transaction()
        await locking.start()
        await lock.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", first.id)
        second, third, fourth = [
            (await service.submit(prompt(text)))[0]
            for text in ("second [[fake: sleep:6000]]", "third", "fourth")
        ]

        # Then, while the first finishes, the second has the model slot and the third is
        # taken ahead in its place (the finishing job does not count against the prefetch) ...
        await wait_for(lambda: running(third.id), timeout_s=WAIT_S)
        assert "second [[fake: sleep:6000]]" in fake_llm.stats.arrivals
        assert await status(second.id) == JobStatus.RUNNING  # not taken when the second ended
        assert await status(first.id) == JobStatus.RUNNING  # still waiting on the lock
        # ... and only the third: the prefetch is still one job waiting for the slot
        assert await status(fourth.id) == JobStatus.QUEUED
        await locking.commit()
    finally:
        await lock.close()

    # And every job finishes once the lock is gone
    jobs = [first, second, third, fourth]
    await wait_terminal(service.store, [j.id for j in jobs], timeout_s=WAIT_S)
    assert {await status(j.id) for j in jobs} == {JobStatus.SUCCEEDED}


async def test_a_job_starts_without_a_round_trip_of_its_own(
    service: JobService,
    start_idle_worker: IdleWorkerFactory,
    fake_llm: FakeLLM,
    redis_url: str,
) -> None:
    # Given an idle worker, and every command Redis runs, watched
    worker = await start_idle_worker()
    watcher = redis.Redis.from_url(redis_url)
    db = watcher.connection_pool.connection_kwargs.get("db", 0)
    async with watcher.monitor() as monitor:
        # When a job fails once and then succeeds (two starts: tries 1 and 2)
        job, _ = await service.submit(prompt("two starts [[fake: 500, ok]]"))
        seen: list[dict[str, Any]] = []

        async def finished() -> bool:
            while True:  # until the job's arq key is deleted at its end
                command = await monitor.next_command()
                if command.get("db") == db and job.id in command["command"]:
                    seen.append(command)
                    if command["command"].startswith("DEL") and "arq:job:" in command["command"]:
                        return True

        async with asyncio.timeout(WAIT_S):
            await finished()
    await watcher.aclose()

    # Then arq's start-of-job reads (the job, its try count) ran inside the claim script, both
    # times, and the job ran as arq would have run it
    starts = [c for c in seen if c["command"].startswith(("GET", "INCR"))]
    assert [c["command"].split()[0] for c in starts] == ["GET", "INCR"] * 2
    assert all(c["client_type"] == "lua" for c in starts), starts
    attempts = await service.store.list_attempts(job.id)
    assert [a.outcome for a in attempts] == [
        AttemptOutcome.TRANSIENT_ERROR,
        AttemptOutcome.SUCCEEDED,
    ]
    assert worker.jobs_retried == 1


async def test_jobs_that_ended_while_redis_was_away_do_not_hold_the_worker_back(
    start_idle_worker: IdleWorkerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a worker whose jobs ended while Redis was away: arq could not write their end
    worker = await start_idle_worker()

    async def end_lost() -> None:
        raise RedisConnectionError("Redis went away as the job ended")

    ended = {f"ended-{n}": asyncio.create_task(end_lost()) for n in range(5)}
    await asyncio.gather(*ended.values(), return_exceptions=True)
    worker.tasks.update(ended)

    # When it polls again, with Redis back
    await worker._poll_iteration()

    # Then all of them are forgotten in that one poll, said once, and the worker does not back
    # off as if Redis were still away
    assert not set(ended) & set(worker.tasks)
    assert worker._failures == 0
    said = [
        r.getMessage() for r in caplog.records if "ended while Redis was away" in r.getMessage()
    ]
    assert len(said) == 1 and said[0].startswith("5 job(s)")
