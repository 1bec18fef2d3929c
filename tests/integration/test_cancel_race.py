"""A cancel that meets a running job just as its attempt stops (fails, is handed back, or its
worker is lost) ends the job: it is not started again (real SQLite and PostgreSQL, real Redis).
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from promptq import clock
from promptq.cancel import Canceller
from promptq.models import AttemptOutcome, Job, JobStatus
from promptq.schemas import PromptJobCreate
from promptq.service import JobService
from promptq.store import CANCELLED_CODE, AttemptResult, Claim


async def running_job(service: JobService, worker: str = "w1") -> Claim:
    """A prompt job, submitted and claimed by `worker`."""
    job, _ = await service.submit(
        PromptJobCreate.model_validate(
            {"kind": "prompt", "messages": [{"role": "user", "content": "hi"}], "max_attempts": 5}
        )
    )
    claim = await service.store.claim(job.id, worker=worker, lease_s=60)
    assert isinstance(claim, Claim)
    return claim


async def cancel(service: JobService, job_id: str) -> None:
    """Cancel through the API's code path; the job is running, so it is only flagged."""
    job = await Canceller(service).cancel_job(job_id, owned_by=None)
    assert job.status == JobStatus.RUNNING and job.cancel_requested_at is not None


async def test_an_attempt_that_fails_after_a_cancel_does_not_retry(service: JobService) -> None:
    claim = await running_job(service)
    await cancel(service, claim.job_id)

    # When the attempt fails with a transient error and its worker schedules a retry
    moved = await service.store.finish_attempt(
        claim,
        AttemptResult(outcome=AttemptOutcome.TRANSIENT_ERROR, status_code=503, error="busy"),
        job_status=JobStatus.RETRYING,
        next_attempt_at=clock.now() + timedelta(seconds=1),
    )

    # Then the job is cancelled instead, the worker is told not to bring it back, and the
    # attempt keeps what really happened to it
    assert moved is False
    job = await service.store.get_job(claim.job_id)
    assert job is not None and job.status == JobStatus.CANCELLED
    assert (job.error_code, job.attempts, job.next_attempt_at) == (CANCELLED_CODE, 1, None)
    assert job.finished_at is not None
    [attempt] = await service.store.list_attempts(claim.job_id)
    assert (attempt.outcome, attempt.status_code) == (AttemptOutcome.TRANSIENT_ERROR, 503)
    assert await service.store.claim(claim.job_id, worker="w2", lease_s=60) is None


async def test_an_attempt_handed_back_after_a_cancel_is_cancelled(service: JobService) -> None:
    claim = await running_job(service)
    await cancel(service, claim.job_id)

    # When its worker stops and hands the attempt back, uncharged
    moved = await service.store.finish_attempt(
        claim,
        AttemptResult(outcome=AttemptOutcome.INTERRUPTED, error="interrupted: worker stopped"),
        job_status=JobStatus.QUEUED,
    )

    assert moved is False
    job = await service.store.get_job(claim.job_id)
    assert job is not None and job.status == JobStatus.CANCELLED
    assert (job.attempts, job.interruptions) == (1, 1)
    assert await service.store.claim(claim.job_id, worker="w2", lease_s=60) is None


async def test_a_lost_workers_job_with_a_cancel_is_not_started_again(service: JobService) -> None:
    claim = await running_job(service)
    await cancel(service, claim.job_id)
    # its worker dies before it hears of the cancel: the lease runs out
    async with service.store.sessionmaker() as session, session.begin():
        await session.execute(
            update(Job)
            .where(Job.id == claim.job_id)
            .values(lease_expires_at=clock.now() - timedelta(seconds=1))
        )

    # When another worker takes the job over
    taken = await service.store.claim(claim.job_id, worker="w2", lease_s=60)

    # Then it cancels it instead of starting attempt 2; attempt 1 is recorded as interrupted
    assert taken is None
    job = await service.store.get_job(claim.job_id)
    assert job is not None and job.status == JobStatus.CANCELLED
    assert (job.error_code, job.attempts, job.interruptions) == (CANCELLED_CODE, 1, 1)
    [attempt] = await service.store.list_attempts(claim.job_id)
    assert attempt.outcome == AttemptOutcome.INTERRUPTED


async def test_without_a_cancel_the_same_moves_happen(service: JobService) -> None:
    # The checks above change nothing for a job nobody cancelled
    claim = await running_job(service)
    moved = await service.store.finish_attempt(
        claim,
        AttemptResult(outcome=AttemptOutcome.TRANSIENT_ERROR, status_code=503, error="busy"),
        job_status=JobStatus.RETRYING,
        next_attempt_at=clock.now(),
    )
    assert moved is True
    again = await service.store.claim(claim.job_id, worker="w2", lease_s=60)
    assert isinstance(again, Claim) and again.number == 2
    moved = await service.store.finish_attempt(
        again,
        AttemptResult(outcome=AttemptOutcome.INTERRUPTED, error="interrupted"),
        job_status=JobStatus.QUEUED,
    )
    assert moved is True
    job = await service.store.get_job(claim.job_id)
    assert job is not None and job.status == JobStatus.QUEUED and job.interruptions == 1
