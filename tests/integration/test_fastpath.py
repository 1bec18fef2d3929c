"""The store's fast claim/finish path (promptq.fastpath) keeps every guarantee of the general
path, on SQLite and PostgreSQL: it runs on every job, so these cases go through it."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from promptq import clock
from promptq.models import AttemptOutcome, Job, JobAttempt, JobStatus, Priority
from promptq.schemas import PromptJobCreate, SummarizeJobCreate
from promptq.service import JobService
from promptq.store import DEADLINE_EXCEEDED, AttemptResult, Busy, Claim


def request(content: str = "hello", **extra: object) -> PromptJobCreate:
    """A prompt job request."""
    return PromptJobCreate.model_validate(
        {"kind": "prompt", "messages": [{"role": "user", "content": content}], **extra}
    )


async def _set(service: JobService, job_id: str, **values: object) -> None:
    async with service.store.sessionmaker() as session, session.begin():
        await session.execute(update(Job).where(Job.id == job_id).values(**values))


async def test_the_fast_path_is_in_use(service: JobService) -> None:
    fast = service.store._fast
    assert fast is not None and fast.available


async def test_a_claim_returns_the_input_and_writes_rows_as_the_orm_does(
    service: JobService,
) -> None:
    job, _ = await service.submit(request("what is 2+2?", max_attempts=3, deadline_s=600))
    before = clock.now()

    claim = await service.store.claim(job.id, worker="w1", lease_s=30)

    assert isinstance(claim, Claim)
    assert claim.input == job.input
    assert (claim.number, claim.charged, claim.max_attempts) == (1, 1, 3)
    assert claim.deadline_at == job.deadline_at and claim.deadline_s == 600
    row = await service.store.get_job(job.id)
    assert row is not None and row.status == JobStatus.RUNNING and row.attempts == 1
    assert row.started_at is not None and row.started_at >= before
    assert row.lease_expires_at is not None
    assert timedelta(seconds=29) < row.lease_expires_at - row.started_at <= timedelta(seconds=30)
    [attempt] = await service.store.list_attempts(job.id)
    assert (attempt.number, attempt.outcome, attempt.worker, attempt.model) == (
        1,
        AttemptOutcome.RUNNING,
        "w1",
        job.model,
    )
    assert attempt.started_at == row.started_at


async def test_a_second_claim_of_a_running_job_is_refused(service: JobService) -> None:
    job, _ = await service.submit(request())
    first = await service.store.claim(job.id, worker="w1", lease_s=60)

    second = await service.store.claim(job.id, worker="w2", lease_s=60)

    assert isinstance(first, Claim) and isinstance(second, Busy)
    assert len(await service.store.list_attempts(job.id)) == 1


async def test_a_job_past_its_deadline_is_failed_not_started(service: JobService) -> None:
    job, _ = await service.submit(request(deadline_s=60))
    await _set(service, job.id, deadline_at=clock.now() - timedelta(seconds=1))

    assert await service.store.claim(job.id, worker="w1", lease_s=60) is None

    row = await service.store.get_job(job.id)
    assert row is not None and row.status == JobStatus.FAILED
    assert row.error_code == DEADLINE_EXCEEDED
    assert await service.store.list_attempts(job.id) == []


async def test_a_job_without_attempts_left_is_not_started(service: JobService) -> None:
    job, _ = await service.submit(request(max_attempts=2))
    await _set(service, job.id, status=JobStatus.RETRYING, attempts=2)

    assert await service.store.claim(job.id, worker="w1", lease_s=60) is None
    row = await service.store.get_job(job.id)
    assert row is not None and (row.status, row.attempts) == (JobStatus.RETRYING, 2)


async def test_a_success_is_written_once_with_its_attempt(service: JobService) -> None:
    job, _ = await service.submit(request())
    claim = await service.store.claim(job.id, worker="w1", lease_s=60)
    assert isinstance(claim, Claim)
    done = AttemptResult(
        outcome=AttemptOutcome.SUCCEEDED,
        latency_ms=12,
        status_code=200,
        result="four",
        finish_reason="stop",
        prompt_tokens=5,
        completion_tokens=1,
    )

    assert await service.store.finish_attempt(claim, done, job_status=JobStatus.SUCCEEDED)
    again = AttemptResult(outcome=AttemptOutcome.SUCCEEDED, result="five")
    assert not await service.store.finish_attempt(claim, again, job_status=JobStatus.SUCCEEDED)

    row = await service.store.get_job(job.id)
    assert row is not None and row.status == JobStatus.SUCCEEDED
    assert (row.result, row.finish_reason, row.prompt_tokens, row.completion_tokens) == (
        "four",
        "stop",
        5,
        1,
    )
    assert row.lease_expires_at is None and row.finished_at is not None
    async with service.store.sessionmaker() as session:
        attempt = (
            await session.execute(select(JobAttempt).where(JobAttempt.job_id == job.id))
        ).scalar_one()
    assert (attempt.outcome, attempt.latency_ms, attempt.status_code) == (
        AttemptOutcome.SUCCEEDED,
        12,
        200,
    )
    assert attempt.finished_at == row.finished_at


async def test_a_cancelled_job_keeps_its_status_when_the_attempt_succeeds(
    service: JobService,
) -> None:
    job, _ = await service.submit(request())
    claim = await service.store.claim(job.id, worker="w1", lease_s=60)
    assert isinstance(claim, Claim)
    await _set(service, job.id, status=JobStatus.CANCELLED)

    done = AttemptResult(outcome=AttemptOutcome.SUCCEEDED, result="too late")
    assert not await service.store.finish_attempt(claim, done, job_status=JobStatus.SUCCEEDED)

    row = await service.store.get_job(job.id)
    assert row is not None and row.status == JobStatus.CANCELLED and row.result is None
    [attempt] = await service.store.list_attempts(job.id)
    assert attempt.outcome == AttemptOutcome.SUCCEEDED  # what happened is still recorded


async def test_a_retry_then_a_second_claim_continues_the_numbering(service: JobService) -> None:
    job, _ = await service.submit(request(max_attempts=3))
    first = await service.store.claim(job.id, worker="w1", lease_s=60)
    assert isinstance(first, Claim)
    failed = AttemptResult(
        outcome=AttemptOutcome.TRANSIENT_ERROR, status_code=503, error="overloaded"
    )
    assert await service.store.finish_attempt(first, failed, job_status=JobStatus.RETRYING)

    second = await service.store.claim(job.id, worker="w2", lease_s=60)

    assert isinstance(second, Claim) and (second.number, second.charged) == (2, 2)
    attempts = await service.store.list_attempts(job.id)
    assert [(a.number, a.outcome) for a in attempts] == [
        (1, AttemptOutcome.TRANSIENT_ERROR),
        (2, AttemptOutcome.RUNNING),
    ]


async def test_claims_that_come_together_each_get_their_own_answer(
    service: JobService,
) -> None:
    # Ten claimable jobs are claimed at the same moment by two workers, one of them twice,
    # along with a finished job and one past its deadline
    jobs = [(await service.submit(request(f"c{i}", max_attempts=4)))[0] for i in range(10)]
    done, _ = await service.submit(request("done"))
    await _set(service, done.id, status=JobStatus.SUCCEEDED)
    late, _ = await service.submit(request("late", deadline_s=60))
    await _set(service, late.id, deadline_at=clock.now() - timedelta(seconds=1))
    fast = service.store._fast
    assert fast is not None
    before = fast._sqlite_writes.transactions

    claims = await asyncio.gather(
        *(
            service.store.claim(job.id, worker=f"w{i % 2}", lease_s=60)
            for i, job in enumerate(jobs)
        ),
        service.store.claim(jobs[3].id, worker="w9", lease_s=60),
        service.store.claim(done.id, worker="w1", lease_s=60),
        service.store.claim(late.id, worker="w1", lease_s=60),
    )

    # Each got its own answer; of the two claims of one job, one took it and the other found
    # it taken (PostgreSQL runs them on their own connections, in either order; on SQLite they
    # shared one transaction)
    if not fast.postgres:
        assert fast._sqlite_writes.transactions - before == 1
    workers = [f"w{i % 2}" for i in range(10)]
    if isinstance(claims[10], Claim):
        claims[3], claims[10], workers[3] = claims[10], claims[3], "w9"
    for job, claim, worker in zip(jobs, claims, workers, strict=False):
        assert isinstance(claim, Claim) and claim.job_id == job.id
        assert (claim.input, claim.number, claim.max_attempts) == (job.input, 1, 4)
        [attempt] = await service.store.list_attempts(job.id)
        assert (attempt.number, attempt.outcome, attempt.worker) == (
            1,
            AttemptOutcome.RUNNING,
            worker,
        )
    assert isinstance(claims[10], Busy)
    assert claims[11] is None and claims[12] is None
    late_row = await service.store.get_job(late.id)
    assert late_row is not None and late_row.status == JobStatus.FAILED
    assert late_row.error_code == DEADLINE_EXCEEDED
    assert await service.store.list_attempts(done.id) == []


async def test_successes_that_end_together_are_written_together_each_once(
    service: JobService,
) -> None:
    # Twelve jobs end at the same moment; one of them twice (a late duplicate)
    jobs = [(await service.submit(request(f"q{i}")))[0] for i in range(12)]
    claims = [await service.store.claim(job.id, worker="w1", lease_s=60) for job in jobs]
    assert all(isinstance(claim, Claim) for claim in claims)

    def done(i: int) -> AttemptResult:
        return AttemptResult(
            outcome=AttemptOutcome.SUCCEEDED,
            latency_ms=10 + i,
            status_code=200,
            result=f"answer {i}",
            finish_reason="stop",
            prompt_tokens=i,
            completion_tokens=2 * i,
        )

    writes = [
        service.store.finish_attempt(claim, done(i), job_status=JobStatus.SUCCEEDED)  # type: ignore[arg-type]
        for i, claim in enumerate(claims)
    ]
    duplicate = service.store.finish_attempt(
        claims[0],  # type: ignore[arg-type]
        AttemptResult(outcome=AttemptOutcome.SUCCEEDED, result="late"),
        job_status=JobStatus.SUCCEEDED,
    )
    moved = await asyncio.gather(*writes, duplicate)

    # Each write got its own answer, and each row holds its own values
    assert moved == [True] * 12 + [False]
    for i, job in enumerate(jobs):
        row = await service.store.get_job(job.id)
        assert row is not None and row.status == JobStatus.SUCCEEDED
        assert (row.result, row.prompt_tokens, row.completion_tokens) == (f"answer {i}", i, 2 * i)
        [attempt] = await service.store.list_attempts(job.id)
        assert (attempt.outcome, attempt.latency_ms) == (AttemptOutcome.SUCCEEDED, 10 + i)
        assert attempt.finished_at == row.finished_at


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_one_unwritable_claim_does_not_fail_the_others_written_with_it(
    service: JobService,
) -> None:
    # A worker name too long for its VARCHAR(255) fails that claim's attempt row on
    # PostgreSQL; the claims made at the same moment stand, and the failed one took nothing
    jobs = [(await service.submit(request(f"u{i}")))[0] for i in range(3)]
    workers = ["w1", "w" * 300, "w3"]
    outcomes = await asyncio.gather(
        *(
            service.store.claim(job.id, worker=worker, lease_s=60)
            for job, worker in zip(jobs, workers, strict=True)
        ),
        return_exceptions=True,
    )

    assert isinstance(outcomes[0], Claim) and isinstance(outcomes[2], Claim)
    assert isinstance(outcomes[1], Exception)
    statuses = [(await service.store.get_job(job.id)).status for job in jobs]  # type: ignore[union-attr]
    assert statuses == [JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.RUNNING]
    assert [len(await service.store.list_attempts(job.id)) for job in jobs] == [1, 0, 1]


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_one_unwritable_success_does_not_fail_the_others_written_with_it(
    service: JobService,
) -> None:
    # A finish_reason too long for its VARCHAR(32) fails that write on PostgreSQL; the others
    # written in the same statement stand (each is then written on its own)
    jobs = [(await service.submit(request(f"n{i}")))[0] for i in range(3)]
    claims = [await service.store.claim(job.id, worker="w1", lease_s=60) for job in jobs]
    reasons = ["stop", "x" * 40, "length"]
    outcomes = await asyncio.gather(
        *(
            service.store.finish_attempt(
                claim,  # type: ignore[arg-type]
                AttemptResult(outcome=AttemptOutcome.SUCCEEDED, result="ok", finish_reason=why),
                job_status=JobStatus.SUCCEEDED,
            )
            for claim, why in zip(claims, reasons, strict=True)
        ),
        return_exceptions=True,
    )

    assert outcomes[0] is True and outcomes[2] is True
    assert isinstance(outcomes[1], Exception)
    statuses = [(await service.store.get_job(job.id)).status for job in jobs]  # type: ignore[union-attr]
    assert statuses == [JobStatus.SUCCEEDED, JobStatus.RUNNING, JobStatus.SUCCEEDED]


async def test_a_waiting_request_is_read_for_the_limiter_before_the_claim(
    service: JobService,
) -> None:
    prompt, _ = await service.submit(request("how long?"))
    await _set(service, prompt.id, priority=Priority.INTERACTIVE)
    summary, _ = await service.submit(
        SummarizeJobCreate.model_validate({"kind": "summarize", "document": "word " * 50})
    )

    waiting = await service.store.waiting_request(prompt.id)
    assert waiting is not None
    assert (waiting.model, waiting.kind, waiting.priority) == (
        prompt.model,
        "prompt",
        Priority.INTERACTIVE,
    )
    assert waiting.input == prompt.input
    # a summarize job's document is not read: its calls reserve a context window each
    summary_waiting = await service.store.waiting_request(summary.id)
    assert summary_waiting is not None
    assert (summary_waiting.kind, summary_waiting.input) == ("summarize", None)

    # a job that is running, or missing, is not waiting
    assert isinstance(await service.store.claim(prompt.id, worker="w1", lease_s=60), Claim)
    assert await service.store.waiting_request(prompt.id) is None
    assert await service.store.waiting_request("no-such-job") is None
