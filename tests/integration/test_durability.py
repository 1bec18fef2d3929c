"""Leases, the reconciler, dead-letter retries and deadlines, on SQLite and PostgreSQL.

Given in-process workers on real Redis and a real database, with the fake LLM, when leases
are renewed or lapse, Redis forgets jobs, failed jobs are retried or deadlines run out, then
every job still ends once, with every attempt on record and only real attempts charged.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from arq.constants import in_progress_key_prefix
from sqlalchemy import update

from promptq import clock
from promptq.errors import JobNotRetryable, NotFound
from promptq.models import AttemptOutcome, Job, JobStatus
from promptq.schemas import PromptJobCreate
from promptq.service import JobService
from promptq.settings import Settings
from promptq.store import DEADLINE_EXCEEDED, Claim
from promptq.testing.fake_llm import FakeLLM, expected_reply
from tests.conftest import WorkerFactory, wait_for, wait_terminal
from worker.app import marker_ttl_s
from worker.reconcile import GRACE, Reconciler


def prompt(content: str, **extra: Any) -> PromptJobCreate:
    """A prompt job request with one user message."""
    body = {"kind": "prompt", "messages": [{"role": "user", "content": content}], **extra}
    return PromptJobCreate.model_validate(body)


def reply(content: str) -> str:
    """What the fake model answers to `content`."""
    return expected_reply("fake-small", [{"role": "user", "content": content}])


async def set_columns(service: JobService, job_id: str, **values: Any) -> None:
    """Rewrite columns directly, as plain SQL would, to stage a situation."""
    async with service.store._sessionmaker() as session, session.begin():
        await session.execute(update(Job).where(Job.id == job_id).values(**values))


async def job_row(service: JobService, job_id: str) -> Job:
    """The job's row (it must exist)."""
    job = await service.store.get_job(job_id)
    assert job is not None
    return job


async def outcomes(service: JobService, job_id: str) -> list[tuple[int, str]]:
    """(number, outcome) of every attempt."""
    return [(a.number, a.outcome) for a in await service.store.list_attempts(job_id)]


# -- leases -------------------------------------------------------------------------------------


async def test_renewal_extends_only_the_attempts_still_held(service: JobService) -> None:
    jobs = [(await service.submit(prompt(f"lease {i}")))[0] for i in range(3)]
    claims = [await service.store.claim(j.id, worker="w", lease_s=1) for j in jobs]
    assert all(isinstance(c, Claim) for c in claims)
    before = [(await job_row(service, j.id)).lease_expires_at for j in jobs]

    # Job 0 is still held; job 1 was taken over (a newer attempt); job 2 finished.
    await set_columns(service, jobs[1].id, attempts=2)
    await set_columns(service, jobs[2].id, status=JobStatus.SUCCEEDED, lease_expires_at=None)
    renewed = await service.store.renew_leases(
        {jobs[0].id: 1, jobs[1].id: 1, jobs[2].id: 1}, lease_s=60
    )

    assert renewed == 1
    after = [(await job_row(service, j.id)).lease_expires_at for j in jobs]
    assert after[0] is not None and before[0] is not None
    assert after[0] - before[0] > timedelta(seconds=50)
    assert after[1] == before[1] and after[2] is None


async def test_a_renewed_lease_keeps_a_job_longer_than_the_lease(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Two workers that reconcile every 0.2 s: a lapse would hand the job to the other one.
    fast = {"lease_s": 1.2, "reconcile_interval_s": 0.2}
    await start_worker(**fast)
    await start_worker(**fast)
    content = "slow job [[fake: sleep:3000, ok]]"
    job, _ = await service.submit(prompt(content))

    leases: set[datetime] = set()

    async def finished() -> bool:
        row = await job_row(service, job.id)
        if row.lease_expires_at is not None:
            leases.add(row.lease_expires_at)
        return row.status == JobStatus.SUCCEEDED

    await wait_for(finished, timeout_s=15, interval_s=0.1)
    row = await job_row(service, job.id)
    assert (row.attempts, row.interruptions) == (1, 0)
    assert await outcomes(service, job.id) == [(1, AttemptOutcome.SUCCEEDED)]
    assert fake_llm.stats.requests_by_prompt[content] == 1
    assert len(leases) >= 4, "the lease was not renewed while the job ran"


async def test_a_lapsed_lease_is_taken_over_and_the_result_written_once(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    fast = {"lease_s": 1.0, "reconcile_interval_s": 0.2, "worker_concurrency": 1}
    stalled = await start_worker(**fast)
    stalled.ctx["worker_name"] = "stalled"
    # The stalled call answers after 6 s: long after the lease (1 s) lapses and the rescuer takes
    # over, even on a loaded machine (with 2.5 s, a slow takeover let the stalled answer win).
    content = "lapse [[fake: sleep:6000, sleep:300, ok]]"
    job, _ = await service.submit(prompt(content))
    await fake_llm.wait_for_requests(1)
    # The first worker stops renewing (as if its event loop hung) while its call runs on.
    await stalled.ctx["leases"].stop()
    rescuer = await start_worker(**fast)
    rescuer.ctx["worker_name"] = "rescuer"

    await wait_terminal(service.store, [job.id], timeout_s=15)
    await fake_llm.wait_for_requests(2)
    await wait_for(lambda: _no_call_in_flight(fake_llm), timeout_s=10)

    row = await job_row(service, job.id)
    assert row.status == JobStatus.SUCCEEDED and row.result == reply(content)
    assert (row.attempts, row.interruptions) == (2, 1)
    attempts = await service.store.list_attempts(job.id)
    # The stalled worker's late answer changed nothing: its attempt stays interrupted.
    assert [(a.number, a.outcome, a.worker) for a in attempts] == [
        (1, AttemptOutcome.INTERRUPTED, "stalled"),
        (2, AttemptOutcome.SUCCEEDED, "rescuer"),
    ]


async def _no_call_in_flight(fake_llm: FakeLLM) -> bool:
    return fake_llm.stats.in_flight == 0


# -- the reconciler -----------------------------------------------------------------------------


async def test_reconciler_scans_the_whole_backlog_across_passes(service: JobService) -> None:
    jobs = [(await service.submit(prompt(f"backlog {i}")))[0] for i in range(8)]
    for job in jobs:
        await set_columns(service, job.id, updated_at=clock.now() - 2 * GRACE)
    await service.queue.redis.flushdb()
    reconciler = Reconciler(service.store, service.queue, marker_ttl_s=45, batch_size=3)

    passes = [await reconciler.run_once() for _ in range(4)]

    assert passes == [3, 3, 2, 0]
    assert await service.queue.missing([j.id for j in jobs]) == []


async def test_reconciler_unblocks_a_waiting_job_behind_a_stale_marker(
    service: JobService, start_worker: WorkerFactory
) -> None:
    # A worker died between arq's pick-up and our claim: arq's marker fences the job off.
    job, _ = await service.submit(prompt("fenced"))
    await set_columns(service, job.id, updated_at=clock.now() - 2 * GRACE)
    marker = in_progress_key_prefix + job.id
    reconciler = Reconciler(service.store, service.queue, marker_ttl_s=45)

    # A marker set a moment ago: a worker may be about to claim the job. Leave it.
    await service.queue.redis.psetex(marker, 45_000, b"1")
    assert await reconciler.run_once() == 0
    assert await service.queue.redis.exists(marker)
    # A marker set 10 s ago with no claim since: nobody runs the job.
    await service.queue.redis.psetex(marker, 35_000, b"1")
    assert await reconciler.run_once() == 1
    assert not await service.queue.redis.exists(marker)
    await start_worker()
    await wait_terminal(service.store, [job.id], timeout_s=15)
    assert (await job_row(service, job.id)).status == JobStatus.SUCCEEDED


async def test_reconciler_brings_forward_a_job_that_arq_would_hand_out_too_late(
    service: JobService, start_worker: WorkerFactory
) -> None:
    # Two Retry(defer) on one arq job add up in its score: it would wait far too long.
    job, _ = await service.submit(prompt("pushed back"))
    await set_columns(service, job.id, updated_at=clock.now() - 2 * GRACE)
    far_ms = (clock.now() + timedelta(minutes=10)).timestamp() * 1000
    await service.queue.redis.zadd(service.queue.queue_name, {job.id: far_ms})
    reconciler = Reconciler(service.store, service.queue, marker_ttl_s=45)

    assert await reconciler.run_once() == 1
    due_at_ms = (await service.queue.states([job.id]))[job.id].due_at_ms
    assert due_at_ms is not None and due_at_ms < far_ms
    assert await reconciler.run_once() == 0
    await start_worker()
    await wait_terminal(service.store, [job.id], timeout_s=15)


async def test_an_orphan_is_taken_back_while_every_slot_is_busy(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM, settings: Settings
) -> None:
    # Given an orphan (its worker died mid-attempt, arq's marker still set) and a backlog
    # that keeps the only worker's slots busy for a while,
    orphan, _ = await service.submit(prompt("orphan"))
    assert isinstance(await service.store.claim(orphan.id, worker="dead", lease_s=1), Claim)
    marker_age_ms = 10_000  # as if the dead worker had picked the job up 10 s ago
    marker_ttl_ms = round(marker_ttl_s(settings) * 1000) - marker_age_ms
    await service.queue.redis.psetex(in_progress_key_prefix + orphan.id, marker_ttl_ms, b"1")
    await set_columns(service, orphan.id, lease_expires_at=clock.now() - timedelta(seconds=1))
    backlog = [(await service.submit(prompt(f"busy {i}")))[0] for i in range(16)]
    fake_llm.config.latency_ms = 600

    # when a worker starts, then the orphan runs again long before the backlog is through
    # (an arq cron job would have waited behind it).
    await start_worker(worker_concurrency=2, reconcile_interval_s=0.3)
    await wait_terminal(service.store, [orphan.id], timeout_s=10)
    untouched = [j for j in backlog if (await job_row(service, j.id)).attempts == 0]
    assert len(untouched) >= 3
    assert await outcomes(service, orphan.id) == [
        (1, AttemptOutcome.INTERRUPTED),
        (2, AttemptOutcome.SUCCEEDED),
    ]
    row = await job_row(service, orphan.id)
    assert (row.attempts, row.interruptions, row.max_attempts) == (2, 1, 5)


# -- dead letters -------------------------------------------------------------------------------


async def test_retry_gives_failed_jobs_a_fresh_budget_and_keeps_their_history(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    exhausted = "exhausted [[fake: 503, 503, 503, ok]]"
    rejected = "rejected [[fake: 400, ok]]"
    jobs = [
        (await service.submit(prompt(exhausted, max_attempts=2)))[0],
        (await service.submit(prompt(rejected, max_attempts=3)))[0],
    ]
    await start_worker()
    await wait_terminal(service.store, [j.id for j in jobs])
    assert [(await job_row(service, j.id)).status for j in jobs] == ["failed", "failed"]

    requeued = await service.retry([j.id for j in jobs])

    assert sorted(requeued) == sorted(j.id for j in jobs)
    await wait_terminal(service.store, [j.id for j in jobs])
    first, second = [await job_row(service, j.id) for j in jobs]
    # 2 charged, then a fresh budget of 2: the third attempt fails again, the fourth succeeds.
    assert (first.status, first.attempts, first.max_attempts) == ("succeeded", 4, 4)
    assert first.result == reply(exhausted) and first.error is None
    assert await outcomes(service, first.id) == [
        (1, AttemptOutcome.TRANSIENT_ERROR),
        (2, AttemptOutcome.TRANSIENT_ERROR),
        (3, AttemptOutcome.TRANSIENT_ERROR),
        (4, AttemptOutcome.SUCCEEDED),
    ]
    # 1 charged (a permanent error), then a fresh budget of 3.
    assert (second.status, second.attempts, second.max_attempts) == ("succeeded", 2, 4)
    assert await outcomes(service, second.id) == [
        (1, AttemptOutcome.PERMANENT_ERROR),
        (2, AttemptOutcome.SUCCEEDED),
    ]
    assert fake_llm.stats.total_requests == 6


async def test_only_failed_or_cancelled_jobs_can_be_retried(service: JobService) -> None:
    job, _ = await service.submit(prompt("still queued"))

    assert await service.retry([job.id]) == []
    with pytest.raises(JobNotRetryable, match="is queued"):
        await service.retry_one(job.id)
    with pytest.raises(NotFound):
        await service.retry_one("00000000-0000-7000-8000-000000000000")

    await set_columns(service, job.id, status=JobStatus.CANCELLED, finished_at=clock.now())
    retried = await service.retry_one(job.id)
    assert retried.status == JobStatus.QUEUED and retried.finished_at is None
    assert await service.queue.missing([job.id]) == []


# -- deadlines ----------------------------------------------------------------------------------


async def test_deadline_fails_a_job_instead_of_retrying_past_it(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # The server asks for a 5 s pause, but the job has only 2 s in all.
    content = "rate limited [[fake: 429:retry_after=5, ok]]"
    job, _ = await service.submit(prompt(content, deadline_s=2))
    await start_worker()
    await wait_terminal(service.store, [job.id], timeout_s=15)

    row = await job_row(service, job.id)
    assert row.status == JobStatus.FAILED and row.error_code == DEADLINE_EXCEEDED
    assert row.error is not None
    assert "deadline_s of 2 s" in row.error and "HTTP 429" in row.error
    assert await outcomes(service, job.id) == [(1, AttemptOutcome.TRANSIENT_ERROR)]
    assert fake_llm.stats.requests_by_prompt[content] == 1


async def test_deadline_cuts_an_attempt_short(
    service: JobService, start_worker: WorkerFactory
) -> None:
    job, _ = await service.submit(prompt("never answers [[fake: hang]]", deadline_s=1))
    await start_worker()  # the LLM timeout is 5 s; the deadline comes first
    await wait_terminal(service.store, [job.id], timeout_s=15)

    row = await job_row(service, job.id)
    assert row.status == JobStatus.FAILED and row.error_code == DEADLINE_EXCEEDED
    (attempt,) = await service.store.list_attempts(job.id)
    assert attempt.latency_ms is not None and attempt.latency_ms < 2000


async def test_a_job_past_its_deadline_fails_without_an_attempt_and_retry_resets_it(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    job, _ = await service.submit(prompt("too late", deadline_s=30))
    assert job.deadline_at is not None and job.deadline_s == 30
    await set_columns(service, job.id, deadline_at=clock.now() - timedelta(seconds=1))
    await start_worker()
    await wait_terminal(service.store, [job.id])

    row = await job_row(service, job.id)
    assert (row.status, row.error_code, row.attempts) == ("failed", DEADLINE_EXCEEDED, 0)
    assert fake_llm.stats.total_requests == 0

    # A retry counts the deadline from the retry.
    retried = await service.retry_one(job.id)
    assert retried.deadline_at is not None and retried.deadline_at > clock.now()
    await wait_terminal(service.store, [job.id])
    assert (await job_row(service, job.id)).status == JobStatus.SUCCEEDED


async def test_deadline_must_be_positive() -> None:
    with pytest.raises(ValueError, match="deadline_s"):
        prompt("x", deadline_s=0)


async def test_jobs_without_a_deadline_have_none(service: JobService) -> None:
    job, _ = await service.submit(prompt("no deadline"))
    row = await job_row(service, job.id)
    assert row.deadline_s is None and row.deadline_at is None
