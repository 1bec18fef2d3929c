"""The job store: every read and write of job state goes through here.

State transitions are conditional UPDATEs keyed on (status, attempts), so a second delivery of
the same job (arq is at-least-once) can neither double-count an attempt nor overwrite a result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from promptq import clock
from promptq.errors import IdempotencyConflict, ServiceUnavailable
from promptq.models import AttemptOutcome, Job, JobAttempt, JobStatus

logger = logging.getLogger(__name__)

#: Statuses a worker may start an attempt from.
CLAIMABLE = (JobStatus.QUEUED, JobStatus.RETRYING)


@dataclass(frozen=True, slots=True)
class Claim:
    """A worker's right to run attempt `number` of a job."""

    job_id: str
    number: int
    kind: str
    model: str
    input: dict[str, Any]
    max_attempts: int
    #: Attempts that count against max_attempts, this one included.
    charged: int

    @property
    def is_last(self) -> bool:
        """True when a transient failure of this attempt fails the job."""
        return self.charged >= self.max_attempts


@dataclass(frozen=True, slots=True)
class Busy:
    """The job is running elsewhere under a live lease; look again after `retry_in_s`."""

    retry_in_s: float


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What an attempt produced, for the attempt row and (on success) the job row."""

    outcome: AttemptOutcome
    latency_ms: int | None = None
    status_code: int | None = None
    error: str | None = None
    error_code: str | None = None
    result: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class JobState:
    """The fields of a job that change while it runs: cheap to poll (no input, no result)."""

    id: str
    kind: str
    status: str
    attempts: int
    max_attempts: int
    error: str | None
    error_code: str | None


class JobStore:
    """Reads and conditional writes of `jobs` and `job_attempts`."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker

    @property
    def sessionmaker(self) -> async_sessionmaker[AsyncSession]:
        """The session factory, for stores of related tables (promptq.checkpoints)."""
        return self._sessionmaker

    async def ping(self) -> None:
        """Raise ServiceUnavailable unless the database answers."""
        try:
            async with self._sessionmaker() as session:
                await session.execute(text("SELECT 1"))
        except (OperationalError, InterfaceError, OSError) as exc:
            raise ServiceUnavailable("the database is unreachable") from exc

    # -- producers -------------------------------------------------------------------------

    async def create_job(
        self,
        *,
        kind: str,
        model: str,
        input: dict[str, Any],
        max_attempts: int,
        idempotency_key: str | None,
    ) -> tuple[Job, bool]:
        """Insert a queued job. With a known idempotency_key, return the existing one instead.

        Returns (job, created). A reused key with a different request raises IdempotencyConflict.
        """
        if idempotency_key is not None:
            existing = await self._by_idempotency_key(idempotency_key)
            if existing is not None:
                return self._check_same(existing, kind, model, input), False
        now = clock.now()
        job = Job(
            id=clock.new_id(),
            kind=kind,
            status=JobStatus.QUEUED,
            model=model,
            input=input,
            attempts=0,
            interruptions=0,
            max_attempts=max_attempts,
            idempotency_key=idempotency_key,
            created_at=now,
            updated_at=now,
        )
        try:
            async with self._sessionmaker() as session, session.begin():
                session.add(job)
        except IntegrityError:
            # Lost a race with a concurrent request carrying the same key.
            if idempotency_key is None:
                raise
            existing = await self._by_idempotency_key(idempotency_key)
            if existing is None:
                raise
            return self._check_same(existing, kind, model, input), False
        return job, True

    async def _by_idempotency_key(self, key: str) -> Job | None:
        async with self._sessionmaker() as session:
            result = await session.execute(select(Job).where(Job.idempotency_key == key))
            return result.scalar_one_or_none()

    @staticmethod
    def _check_same(job: Job, kind: str, model: str, input: dict[str, Any]) -> Job:
        if (job.kind, job.model, job.input) != (kind, model, input):
            raise IdempotencyConflict(
                f"idempotency_key {job.idempotency_key!r} was already used by job {job.id} "
                "for a different request; use a new key for a new request"
            )
        return job

    # -- readers ---------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job | None:
        """The job, or None."""
        async with self._sessionmaker() as session:
            return await session.get(Job, job_id)

    async def list_jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        before_id: str | None = None,
    ) -> list[Job]:
        """Newest first; pass the last id seen as `before_id` for the next page."""
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if status is not None:
            query = query.where(Job.status == status)
        if kind is not None:
            query = query.where(Job.kind == kind)
        if before_id is not None:
            query = query.where(Job.id < before_id)
        async with self._sessionmaker() as session:
            return list((await session.execute(query)).scalars())

    async def get_states(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        """The current state of each job that exists, by id, without its input or result."""
        if not job_ids:
            return {}
        query = select(
            Job.id, Job.kind, Job.status, Job.attempts, Job.max_attempts, Job.error, Job.error_code
        ).where(Job.id.in_(list(job_ids)))
        async with self._sessionmaker() as session:
            rows = await session.execute(query)
            return {row.id: JobState(*row) for row in rows}

    async def list_attempts(self, job_id: str) -> list[JobAttempt]:
        """Every attempt of a job, in order."""
        query = select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.number)
        async with self._sessionmaker() as session:
            return list((await session.execute(query)).scalars())

    async def unqueued_candidates(self, *, older_than: datetime, limit: int) -> Sequence[Job]:
        """Jobs that should be in Redis: waiting ones last touched before `older_than`, and
        running ones whose lease has expired (their worker is gone)."""
        waiting = and_(Job.status.in_(CLAIMABLE), Job.updated_at < older_than)
        orphaned = and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < clock.now())
        query = select(Job).where(or_(waiting, orphaned)).order_by(Job.id).limit(limit)
        async with self._sessionmaker() as session:
            return list((await session.execute(query)).scalars())

    # -- the worker's transitions ----------------------------------------------------------

    async def claim(self, job_id: str, *, worker: str, lease_s: float) -> Claim | Busy | None:
        """Start the next attempt under a lease of `lease_s`; None if the job must not run.

        A job found `running` under a live lease is Busy. Once its lease has expired, the worker
        running it is presumed dead: its open attempt is recorded as interrupted (and not
        charged) and a new attempt starts.
        """
        now = clock.now()
        async with self._sessionmaker() as session, session.begin():
            job = await session.get(Job, job_id)
            if job is None or JobStatus(job.status).is_terminal:
                return None
            if job.status == JobStatus.RUNNING and job.lease_expires_at is not None:
                if job.lease_expires_at > now:
                    return Busy((job.lease_expires_at - now).total_seconds())
            if job.status == JobStatus.RUNNING:
                await self._interrupt_open_attempts(session, job_id, now, "worker lost")
                seen_status = JobStatus.RUNNING
                interrupted = 1
            else:
                seen_status = JobStatus(job.status)
                interrupted = 0
            charged = job.attempts - job.interruptions - interrupted + 1
            if charged > job.max_attempts:
                logger.warning("job %s has no attempts left but is %s", job_id, job.status)
                return None
            number = job.attempts + 1
            won = await session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.status == seen_status,
                    Job.attempts == job.attempts,
                )
                .values(
                    status=JobStatus.RUNNING,
                    attempts=number,
                    interruptions=Job.interruptions + interrupted,
                    started_at=func.coalesce(Job.started_at, now),
                    next_attempt_at=None,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    updated_at=now,
                )
            )
            if won.rowcount != 1:  # type: ignore[attr-defined]
                await session.rollback()
                return None
            session.add(
                JobAttempt(
                    job_id=job_id,
                    number=number,
                    started_at=now,
                    outcome=AttemptOutcome.RUNNING,
                    worker=worker,
                    model=job.model,
                )
            )
            return Claim(
                job_id=job_id,
                number=number,
                kind=job.kind,
                model=job.model,
                input=job.input,
                max_attempts=job.max_attempts,
                charged=charged,
            )

    async def finish_attempt(
        self,
        claim: Claim,
        result: AttemptResult,
        *,
        job_status: JobStatus,
        next_attempt_at: datetime | None = None,
    ) -> bool:
        """Close the attempt and move the job to `job_status`, if the claim still holds.

        Returns False when the job moved on without us (cancelled, or reclaimed elsewhere).
        """
        now = clock.now()
        job_values: dict[str, Any] = {
            "status": job_status,
            "updated_at": now,
            "lease_expires_at": None,
        }
        if job_status == JobStatus.SUCCEEDED:
            job_values |= {
                "result": result.result,
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "error": None,
                "error_code": None,
            }
        elif result.error is not None:
            job_values |= {"error": result.error, "error_code": result.error_code}
        if job_status.is_terminal:
            job_values["finished_at"] = now
        if job_status == JobStatus.RETRYING:
            job_values["next_attempt_at"] = next_attempt_at
        if result.outcome == AttemptOutcome.INTERRUPTED:
            job_values["interruptions"] = Job.interruptions + 1
        async with self._sessionmaker() as session, session.begin():
            await session.execute(
                update(JobAttempt)
                .where(
                    JobAttempt.job_id == claim.job_id,
                    JobAttempt.number == claim.number,
                    JobAttempt.outcome == AttemptOutcome.RUNNING,
                )
                .values(
                    outcome=result.outcome,
                    finished_at=now,
                    status_code=result.status_code,
                    error=result.error,
                    latency_ms=result.latency_ms,
                    prompt_tokens=result.prompt_tokens,
                    completion_tokens=result.completion_tokens,
                )
            )
            moved = await session.execute(
                update(Job)
                .where(
                    Job.id == claim.job_id,
                    Job.status == JobStatus.RUNNING,
                    Job.attempts == claim.number,
                )
                .values(**job_values)
            )
            return bool(moved.rowcount == 1)  # type: ignore[attr-defined]

    @staticmethod
    async def _interrupt_open_attempts(
        session: AsyncSession, job_id: str, now: datetime, reason: str
    ) -> None:
        await session.execute(
            update(JobAttempt)
            .where(
                JobAttempt.job_id == job_id,
                JobAttempt.outcome == AttemptOutcome.RUNNING,
            )
            .values(outcome=AttemptOutcome.INTERRUPTED, finished_at=now, error=reason)
        )
