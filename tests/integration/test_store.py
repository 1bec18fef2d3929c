"""The store's conditional transitions and the reconciler, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from promptq import clock
from promptq.errors import IdempotencyConflict
from promptq.models import AttemptOutcome, Job, JobStatus
from promptq.schemas import PromptJobCreate
from promptq.service import JobService
from promptq.store import AttemptResult, Busy, Claim, JobStore
from promptq.testing.fake_llm import FakeLLM
from tests.conftest import WorkerFactory, wait_terminal
from worker.reconcile import GRACE, Reconciler


def request(content: str = "hello", **extra: object) -> PromptJobCreate:
    """A prompt job request."""
    return PromptJobCreate.model_validate(
        {"kind": "prompt", "messages": [{"role": "user", "content": content}], **extra}
    )


async def test_only_one_of_many_concurrent_claims_wins(service: JobService) -> None:
    job, _ = await service.submit(request())

    claims = await asyncio.gather(
        *(service.store.claim(job.id, worker=f"w{i}", lease_s=60) for i in range(8)),
        return_exceptions=True,
    )

    won = [c for c in claims if isinstance(c, Claim)]
    assert len(won) == 1, claims
    assert all(c is None or isinstance(c, Busy) for c in claims if c is not won[0]), claims
    row = await service.store.get_job(job.id)
    assert row.status == JobStatus.RUNNING and row.attempts == 1
    assert len(await service.store.list_attempts(job.id)) == 1


async def test_orphaned_running_job_is_reclaimed_with_the_lost_attempt_interrupted(
    service: JobService,
) -> None:
    job, _ = await service.submit(request())
    first = await service.store.claim(job.id, worker="dead-worker", lease_s=60)
    assert isinstance(first, Claim)
    # While the lease is live, a second delivery is told to come back later.
    busy = await service.store.claim(job.id, worker="live-worker", lease_s=60)
    assert isinstance(busy, Busy) and 59 < busy.retry_in_s <= 60

    # The worker died mid-attempt and its lease ran out; the job is delivered again.
    await _expire_lease(service, job.id)
    second = await service.store.claim(job.id, worker="live-worker", lease_s=60)

    assert isinstance(second, Claim) and second.number == 2
    assert second.charged == 1  # the interrupted attempt is not charged
    attempts = await service.store.list_attempts(job.id)
    assert [(a.number, a.outcome, a.worker) for a in attempts] == [
        (1, AttemptOutcome.INTERRUPTED, "dead-worker"),
        (2, AttemptOutcome.RUNNING, "live-worker"),
    ]
    row = await service.store.get_job(job.id)
    assert (row.attempts, row.interruptions) == (2, 1)


async def test_a_stale_attempt_cannot_overwrite_a_newer_one(service: JobService) -> None:
    job, _ = await service.submit(request())
    stale = await service.store.claim(job.id, worker="slow", lease_s=60)
    await _expire_lease(service, job.id)
    fresh = await service.store.claim(job.id, worker="fast", lease_s=60)
    assert isinstance(stale, Claim) and isinstance(fresh, Claim)

    done = AttemptResult(outcome=AttemptOutcome.SUCCEEDED, result="fresh answer")
    assert await service.store.finish_attempt(fresh, done, job_status=JobStatus.SUCCEEDED)
    late = AttemptResult(outcome=AttemptOutcome.SUCCEEDED, result="stale answer")
    assert not await service.store.finish_attempt(stale, late, job_status=JobStatus.SUCCEEDED)

    row = await service.store.get_job(job.id)
    assert row.result == "fresh answer" and row.status == JobStatus.SUCCEEDED
    assert await service.store.claim(job.id, worker="third", lease_s=60) is None


async def test_idempotency_key_returns_the_same_job_and_rejects_a_different_request(
    service: JobService,
) -> None:
    results = await asyncio.gather(
        *(service.submit(request("same", idempotency_key="k-1")) for _ in range(6))
    )

    ids = {job.id for job, _ in results}
    assert len(ids) == 1
    assert sum(created for _, created in results) == 1
    assert len(await service.store.list_jobs(limit=100)) == 1
    with pytest.raises(IdempotencyConflict, match="k-1"):
        await service.submit(request("different", idempotency_key="k-1"))
    with pytest.raises(IdempotencyConflict, match="k-1"):
        await service.submit(request("same", idempotency_key="k-1", max_attempts=2))


async def test_reconciler_requeues_jobs_that_redis_lost(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM, settings: object
) -> None:
    jobs = [(await service.submit(request(f"lost {i}")))[0] for i in range(5)]

    reconciler = Reconciler(service.store, service.queue, marker_ttl_s=45)
    orphan, _ = await service.submit(request("orphan"))
    assert isinstance(await service.store.claim(orphan.id, worker="gone", lease_s=60), Claim)
    await service.queue.redis.flushdb()
    jobs.append(orphan)
    assert sorted(await service.queue.missing([j.id for j in jobs])) == sorted(j.id for j in jobs)
    assert await reconciler.run_once() == 0  # fresh rows and live leases are left alone
    for job in jobs[:-1]:  # age the waiting rows past the grace period
        await _age(service, job.id)
    await _expire_lease(service, orphan.id)  # and let the orphan's worker be presumed dead
    assert await reconciler.run_once() == 6
    assert await reconciler.run_once() == 0  # idempotent: now they are all in Redis

    await start_worker()
    await wait_terminal(service.store, [j.id for j in jobs])
    for job in jobs[:-1]:
        row = await service.store.get_job(job.id)
        assert row.status == JobStatus.SUCCEEDED and row.attempts == 1
    row = await service.store.get_job(orphan.id)
    assert row.status == JobStatus.SUCCEEDED and (row.attempts, row.interruptions) == (2, 1)
    assert fake_llm.stats.total_requests == 6


async def _set(service: JobService, job_id: str, **values: object) -> None:
    """Rewrite columns directly, as plain SQL would, to stage a situation."""
    async with service.store._sessionmaker() as session, session.begin():
        await session.execute(update(Job).where(Job.id == job_id).values(**values))


async def _age(service: JobService, job_id: str) -> None:
    await _set(service, job_id, updated_at=clock.now() - 2 * GRACE)


async def _expire_lease(service: JobService, job_id: str) -> None:
    await _set(service, job_id, lease_expires_at=clock.now() - timedelta(seconds=1))


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_a_cancelled_takeover_that_loses_the_race_leaves_the_winners_attempt_alone(
    service: JobService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job whose worker was lost (its lease ran out)
    job, _ = await service.submit(request())
    assert isinstance(await service.store.claim(job.id, worker="lost", lease_s=60), Claim)
    await _expire_lease(service, job.id)
    # And two workers taking it over at once, paused where each records the lost attempt: Y
    # read it before a cancel was asked for, X after; Y commits its takeover while X waits
    y_paused, x_paused = asyncio.Event(), asyncio.Event()
    interrupt = JobStore._interrupt_attempt
    calls = 0

    async def paused(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # Y's
            y_paused.set()
            await x_paused.wait()
        else:  # X's: Y goes first, then X
            x_paused.set()
            await y_claim
        await interrupt(*args)

    monkeypatch.setattr(JobStore, "_interrupt_attempt", staticmethod(paused))
    y_claim = asyncio.ensure_future(service.store.claim(job.id, worker="Y", lease_s=60))
    async with asyncio.timeout(10):
        await y_paused.wait()
        await _set(service, job.id, cancel_requested_at=clock.now())
        x_claim = await service.store.claim(job.id, worker="X", lease_s=60)

    # Then Y runs attempt 2, X gives up, and attempt 2 is still Y's and running
    y_won = await y_claim
    assert isinstance(y_won, Claim) and y_won.number == 2 and x_claim is None
    attempts = await service.store.list_attempts(job.id)
    assert [(a.outcome, a.worker) for a in attempts] == [
        (AttemptOutcome.INTERRUPTED, "lost"),
        (AttemptOutcome.RUNNING, "Y"),
    ]
    row = await service.store.get_job(job.id)
    assert row is not None and row.status == JobStatus.RUNNING and row.attempts == 2


async def test_nul_characters_in_model_output_are_stored_replaced(service: JobService) -> None:
    # PostgreSQL can't store U+0000; a model that emits one must not lose the whole result.
    job, _ = await service.submit(request("nul"))
    claim = await service.store.claim(job.id, worker="w", lease_s=60)
    assert isinstance(claim, Claim)
    done = AttemptResult(outcome=AttemptOutcome.SUCCEEDED, result="a\x00b")
    assert await service.store.finish_attempt(claim, done, job_status=JobStatus.SUCCEEDED)

    row = await service.store.get_job(job.id)
    assert row.result == "a\ufffdb"
