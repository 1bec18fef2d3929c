"""The job store: every read and write of job state goes through here.

State transitions are conditional UPDATEs keyed on (status, attempts), so a second delivery of
the same job (arq is at-least-once) can neither double-count an attempt nor overwrite a result.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, func, select, text, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased, defer

from promptq import clock, single_flight
from promptq.cache import IN_FLIGHT, answered_model, hit_values
from promptq.db import is_db_unavailable
from promptq.errors import IdempotencyConflict, JobNotRetryable, NotFound, ServiceUnavailable
from promptq.fastpath import FastPath, Outcome, move_job
from promptq.models import AttemptOutcome, Job, JobAttempt, JobKind, JobStatus, Priority
from promptq.single_flight import Following

logger = logging.getLogger(__name__)

#: Statuses a worker may start an attempt from.
CLAIMABLE = (JobStatus.QUEUED, JobStatus.RETRYING)
#: Statuses `promptq retry` may send back to the queue.
RETRYABLE = (JobStatus.FAILED, JobStatus.CANCELLED)
#: Rows per statement when a statement lists ids (keeps under every driver's parameter limit).
IDS_PER_STATEMENT = 500
#: `jobs.error_code` of a job that ran out of wall-clock time.
DEADLINE_EXCEEDED = "deadline_exceeded"


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
    #: The job's wall-clock budget and when it runs out, if it has one.
    deadline_s: float | None = None
    deadline_at: datetime | None = None
    #: jobs.priority: an interactive job keeps its place ahead of bulk work when it retries.
    priority: int = 0

    @property
    def is_last(self) -> bool:
        """True when a transient failure of this attempt fails the job."""
        return self.charged >= self.max_attempts

    def seconds_left(self) -> float | None:
        """Time until the job's deadline (negative once past it), if it has one."""
        if self.deadline_at is None:
            return None
        return (self.deadline_at - clock.now()).total_seconds()


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


#: `jobs.error_code` and error of a job cancelled before or while it ran.
CANCELLED_CODE = "cancelled"
CANCELLED_MESSAGE = "cancelled on request"


def cancelled_values(now: datetime) -> dict[str, Any]:
    """A job row's values once it is cancelled (not yet finished)."""
    return {
        "status": JobStatus.CANCELLED,
        "error": CANCELLED_MESSAGE,
        "error_code": CANCELLED_CODE,
        "next_attempt_at": None,
        "lease_expires_at": None,
        "finished_at": now,
        "updated_at": now,
    }


@dataclass(frozen=True, slots=True)
class WaitingRequest:
    """A job waiting to run, as the limiter sees it before the claim."""

    model: str
    kind: str
    priority: int
    #: A prompt job's input (messages, params); None for other kinds.
    input: dict[str, Any] | None


class JobStore:
    """Reads and conditional writes of `jobs` and `job_attempts`."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker
        bind = sessionmaker.kw.get("bind")
        #: Pre-built claim/finish statements (promptq.fastpath), when the backend allows.
        self._fast = FastPath(bind) if isinstance(bind, AsyncEngine) else None

    @property
    def sessionmaker(self) -> async_sessionmaker[AsyncSession]:
        """The session factory, for stores of related tables (promptq.checkpoints)."""
        return self._sessionmaker

    async def waiting_request(self, job_id: str) -> WaitingRequest | None:
        """What a job waiting to run (queued, retrying) asks of the model; None otherwise.

        None for a follower too (promptq.single_flight): it may never call the model.
        """
        if self._fast is not None and self._fast.available:
            row = await self._fast.waiting(job_id)
            return None if row is None else WaitingRequest(*row)
        async with self._sessionmaker() as session:
            found = (
                await session.execute(
                    select(Job.model, Job.kind, Job.priority, Job.input).where(
                        Job.id == job_id, Job.status.in_(CLAIMABLE), Job.cached_from.is_(None)
                    )
                )
            ).first()
        if found is None:
            return None
        model, kind, priority, input_ = found
        return WaitingRequest(model, kind, priority, input_ if kind == JobKind.PROMPT else None)

    async def ping(self) -> None:
        """Raise ServiceUnavailable unless the database answers."""
        try:
            async with self._sessionmaker() as session:
                await session.execute(text("SELECT 1"))
        except Exception as exc:
            if not is_db_unavailable(exc):
                raise
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
        owner_key_id: str | None = None,
        deadline_s: float | None = None,
        request_hash: str | None = None,
        answer_from: Row[Any] | None = None,
        leader_id: str | None = None,
        priority: int = Priority.BULK,
    ) -> tuple[Job, bool]:
        """Insert a queued job. With a known idempotency_key, return the existing one instead.

        Idempotency keys are per owner: the same key from two owners makes two jobs.
        Returns (job, created). A reused key with a different request raises IdempotencyConflict.
        With `answer_from` (a cache hit, see promptq.cache) the job is written already
        succeeded with that job's answer, and 0 attempts; with `leader_id` it is queued to
        wait for that identical job's answer (promptq.single_flight).
        """
        if idempotency_key is not None:
            existing = await self._by_idempotency_key(idempotency_key, owner_key_id)
            if existing is not None:
                return self._check_same(
                    existing, kind, model, input, max_attempts, deadline_s
                ), False
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
            attempt_budget=max_attempts,
            deadline_s=deadline_s,
            deadline_at=_deadline_at(now, deadline_s),
            idempotency_key=idempotency_key,
            owner_key_id=owner_key_id,
            request_hash=request_hash,
            cached_from=leader_id,
            priority=priority,
            created_at=now,
            updated_at=now,
        )
        if answer_from is not None:
            for column, value in hit_values(answer_from, now).items():
                setattr(job, column, value)
        try:
            async with self._sessionmaker() as session, session.begin():
                session.add(job)
        except IntegrityError:
            # Lost a race with a concurrent request carrying the same key.
            if idempotency_key is None:
                raise
            existing = await self._by_idempotency_key(idempotency_key, owner_key_id)
            if existing is None:
                raise
            return self._check_same(existing, kind, model, input, max_attempts, deadline_s), False
        if answer_from is not None:
            logger.info("job %s answered from the cache (job %s)", job.id, job.cached_from)
        elif leader_id is not None:
            logger.info("job %s waits for the answer of identical job %s", job.id, leader_id)
        return job, True

    async def _by_idempotency_key(self, key: str, owner_key_id: str | None) -> Job | None:
        owner = (
            Job.owner_key_id.is_(None)
            if owner_key_id is None
            else (Job.owner_key_id == owner_key_id)
        )
        async with self._sessionmaker() as session:
            result = await session.execute(select(Job).where(Job.idempotency_key == key, owner))
            return result.scalar_one_or_none()

    @staticmethod
    def _check_same(
        job: Job,
        kind: str,
        model: str,
        input: dict[str, Any],
        max_attempts: int,
        deadline_s: float | None,
    ) -> Job:
        """`job` if it was made by the same request, else IdempotencyConflict. The request is
        its kind, model, input (a prompt's `cache` choice is part of it: JobService.submit),
        max_attempts and deadline_s."""
        if (job.kind, job.model, job.input, job.max_attempts, job.deadline_s) != (
            kind,
            model,
            input,
            max_attempts,
            deadline_s,
        ):
            raise IdempotencyConflict(
                f"idempotency_key {job.idempotency_key!r} was already used by job {job.id} "
                "for a different request; use a new key for a new request"
            )
        return job

    # -- readers ---------------------------------------------------------------------------

    async def get_job(self, job_id: str, *, owned_by: str | None = None) -> Job | None:
        """The job, or None; with `owned_by`, None too unless that key id owns it."""
        query = select(Job).where(Job.id == job_id)
        if owned_by is not None:
            query = query.where(Job.owner_key_id == owned_by)
        async with self._sessionmaker() as session:
            return (await session.execute(query)).scalar_one_or_none()

    async def list_jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        before_id: str | None = None,
        owned_by: str | None = None,
        batch_id: str | None = None,
        model: str | None = None,
        with_input: bool = True,
    ) -> list[Job]:
        """Newest first; pass the last id seen as `before_id` for the next page.

        With `owned_by`, only the jobs that key id owns; with `batch_id` / `model`, only
        those of that batch / model. Without `with_input`, `input` is not read (touching it
        raises): a page of summarize jobs could otherwise weigh a gigabyte.
        """
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if not with_input:
            query = query.options(defer(Job.input, raiseload=True))
        if owned_by is not None:
            query = query.where(Job.owner_key_id == owned_by)
        if status is not None:
            query = query.where(Job.status == status)
        if kind is not None:
            query = query.where(Job.kind == kind)
        if batch_id is not None:
            query = query.where(Job.batch_id == batch_id)
        if model is not None:
            query = query.where(Job.model == model)
        if before_id is not None:
            query = query.where(Job.id < before_id)
        async with self._sessionmaker() as session:
            return list((await session.execute(query)).scalars())

    async def get_states(
        self, job_ids: Sequence[str], *, owned_by: str | None = None
    ) -> dict[str, JobState]:
        """The current state of each job that exists, by id, without its input or result;
        with `owned_by`, only the jobs that key id owns."""
        if not job_ids:
            return {}
        query = select(
            Job.id, Job.kind, Job.status, Job.attempts, Job.max_attempts, Job.error, Job.error_code
        ).where(Job.id.in_(list(job_ids)))
        if owned_by is not None:
            query = query.where(Job.owner_key_id == owned_by)
        async with self._sessionmaker() as session:
            rows = await session.execute(query)
            return {row.id: JobState(*row) for row in rows}

    async def priorities(self, job_ids: Sequence[str]) -> dict[str, int]:
        """`jobs.priority` of each job that exists, by id."""
        found: dict[str, int] = {}
        for start in range(0, len(job_ids), IDS_PER_STATEMENT):
            chunk = list(job_ids[start : start + IDS_PER_STATEMENT])
            async with self._sessionmaker() as session:
                rows = await session.execute(select(Job.id, Job.priority).where(Job.id.in_(chunk)))
                found.update({row.id: row.priority for row in rows})
        return found

    async def in_flight(self, job_ids: Collection[str]) -> set[str]:
        """The jobs among `job_ids` still on their way to an answer (queued, retrying, running)."""
        ids, found = list(job_ids), set[str]()
        for start in range(0, len(ids), IDS_PER_STATEMENT):
            query = select(Job.id).where(
                Job.id.in_(ids[start : start + IDS_PER_STATEMENT]), Job.status.in_(IN_FLIGHT)
            )
            async with self._sessionmaker() as session:
                found.update((await session.execute(query)).scalars())
        return found

    async def list_attempts(self, job_id: str, *, owned_by: str | None = None) -> list[JobAttempt]:
        """Every attempt of a job, in order; with `owned_by`, none unless that key id owns it."""
        query = select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.number)
        if owned_by is not None:
            query = query.join(Job, Job.id == JobAttempt.job_id).where(Job.owner_key_id == owned_by)
        async with self._sessionmaker() as session:
            return list((await session.execute(query)).scalars())

    async def answered_model(self, job: Job) -> str:
        """The model that made a succeeded job's answer: its own, unless a fallback did."""
        if not job.input.get("fallback_models"):
            return job.model
        async with self._sessionmaker() as session:
            found = await session.scalar(select(answered_model(job)))
        return found or job.model

    async def expired_leases(self, *, now: datetime, limit: int) -> list[str]:
        """Ids of running jobs whose lease ran out before `now`: their worker is gone."""
        query = (
            select(Job.id)
            .where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
            .order_by(Job.id)
            .limit(limit)
        )
        async with self._sessionmaker() as session:
            return list((await session.execute(query)).scalars())

    async def waiting_jobs(
        self, *, older_than: datetime, after_id: str | None, limit: int
    ) -> list[tuple[str, datetime | None, int]]:
        """(id, next_attempt_at, priority) of queued/retrying jobs last touched before
        `older_than`, in id order after `after_id`: one page of a scan that resumes where it
        stopped."""
        query = (
            select(Job.id, Job.next_attempt_at, Job.priority)
            .where(Job.status.in_(CLAIMABLE), Job.updated_at < older_than)
            .order_by(Job.id)
            .limit(limit)
        )
        if after_id is not None:
            query = query.where(Job.id > after_id)
        async with self._sessionmaker() as session:
            return [
                (row.id, row.next_attempt_at, row.priority) for row in await session.execute(query)
            ]

    async def ids_with_status(self, status: str, *, after_id: str | None, limit: int) -> list[str]:
        """Ids of jobs in `status`, in id order after `after_id`."""
        query = select(Job.id).where(Job.status == status).order_by(Job.id).limit(limit)
        if after_id is not None:
            query = query.where(Job.id > after_id)
        async with self._sessionmaker() as session:
            return list((await session.execute(query)).scalars())

    # -- dead letters ----------------------------------------------------------------------

    async def requeue(self, job_ids: Sequence[str]) -> list[str]:
        """Send failed or cancelled jobs back to `queued` with a fresh attempt budget.

        Old attempts stay; new ones continue the numbering. A job with a deadline gets its
        deadline_s again, counted from now. A summarize job cuts full-size chunks again (its
        chunk_scale, shrunk by truncated prompts, is reset: the retry may follow a fix of the
        model's window, and if not, it learns the scale again). Returns the ids re-queued.
        """
        now = clock.now()
        requeued: list[str] = []
        for start in range(0, len(job_ids), IDS_PER_STATEMENT):
            chunk = list(job_ids[start : start + IDS_PER_STATEMENT])
            async with self._sessionmaker() as session, session.begin():
                rows = await session.execute(
                    select(Job.id, Job.deadline_s).where(
                        Job.id.in_(chunk), Job.status.in_(RETRYABLE)
                    )
                )
                by_deadline: dict[float | None, list[str]] = {}
                for row in rows:
                    by_deadline.setdefault(row.deadline_s, []).append(row.id)
                for deadline_s, ids in by_deadline.items():
                    result = await session.execute(
                        update(Job)
                        .where(Job.id.in_(ids), Job.status.in_(RETRYABLE))
                        .values(
                            status=JobStatus.QUEUED,
                            max_attempts=Job.attempts - Job.interruptions + Job.attempt_budget,
                            deadline_at=_deadline_at(now, deadline_s),
                            error=None,
                            error_code=None,
                            finished_at=None,
                            next_attempt_at=None,
                            lease_expires_at=None,
                            cancel_requested_at=None,
                            chunk_scale=1.0,
                            updated_at=now,
                        )
                        .returning(Job.id)
                        .execution_options(synchronize_session=False)
                    )
                    requeued.extend(result.scalars())
        await self._unfollow_settled(requeued)
        return requeued

    async def _unfollow_settled(self, job_ids: Sequence[str]) -> None:
        """Re-queued followers (a refusal taken, or cancelled while waiting) keep following a
        leader that runs again (re-queued with them: one call for all), and make their own call
        otherwise: a retry must not take an old refusal again."""
        leader = aliased(Job)
        running = select(leader.id).where(
            leader.id == Job.cached_from, leader.status.in_(IN_FLIGHT)
        )
        for start in range(0, len(job_ids), IDS_PER_STATEMENT):
            chunk = list(job_ids[start : start + IDS_PER_STATEMENT])
            async with self._sessionmaker() as session, session.begin():
                await session.execute(
                    update(Job)
                    .where(Job.id.in_(chunk), Job.cached_from.is_not(None), ~running.exists())
                    .values(cached_from=None)
                    .execution_options(synchronize_session=False)
                )

    async def requeue_one(self, job_id: str) -> Job:
        """Re-queue one failed or cancelled job; NotFound or JobNotRetryable otherwise."""
        if not await self.requeue([job_id]):
            job = await self.get_job(job_id)
            if job is None:
                raise NotFound(f"no job with id {job_id}")
            raise JobNotRetryable(
                f"job {job_id} is {job.status}; only failed or cancelled jobs can be retried"
            )
        job = await self.get_job(job_id)
        if job is None:  # deleted in between
            raise NotFound(f"no job with id {job_id}")
        return job

    # -- leases ----------------------------------------------------------------------------

    async def renew_leases(self, held: Mapping[str, int], *, lease_s: float) -> int:
        """Extend the leases of the attempts a worker holds ({job id: attempt number}).

        One conditional UPDATE per IDS_PER_STATEMENT jobs: a job that finished, was cancelled
        or was taken over by another worker no longer matches. Returns the rows renewed.
        """
        items = list(held.items())
        renewed = 0
        for start in range(0, len(items), IDS_PER_STATEMENT):
            chunk = items[start : start + IDS_PER_STATEMENT]
            now = clock.now()
            async with self._sessionmaker() as session, session.begin():
                result = await session.execute(
                    update(Job)
                    .where(Job.status == JobStatus.RUNNING, tuple_(Job.id, Job.attempts).in_(chunk))
                    .values(lease_expires_at=now + timedelta(seconds=lease_s))
                    .execution_options(synchronize_session=False)
                )
                renewed += result.rowcount  # type: ignore[attr-defined]
        return renewed

    async def holding(self, held: Mapping[str, int]) -> set[str]:
        """The ids of `held` ({job id: attempt number}) whose attempt still runs its job."""
        items = list(held.items())
        found: set[str] = set()
        for start in range(0, len(items), IDS_PER_STATEMENT):
            chunk = items[start : start + IDS_PER_STATEMENT]
            query = select(Job.id).where(
                Job.status == JobStatus.RUNNING, tuple_(Job.id, Job.attempts).in_(chunk)
            )
            async with self._sessionmaker() as session:
                found.update((await session.execute(query)).scalars())
        return found

    # -- the worker's transitions ----------------------------------------------------------

    async def claim(
        self, job_id: str, *, worker: str, lease_s: float
    ) -> Claim | Busy | Following | None:
        """Start the next attempt under a lease of `lease_s`; None if the job must not run.

        A job found `running` under a live lease is Busy. Once its lease has expired, the worker
        running it is presumed dead: its open attempt is recorded as interrupted (and not
        charged) and a new attempt starts. A follower whose leader is in flight is Following
        (promptq.single_flight).
        """
        now = clock.now()
        if self._fast is not None and self._fast.available:
            row = await self._fast.claim(job_id, worker=worker, now=now, lease_s=lease_s)
            if row is not None:
                return Claim(
                    job_id=job_id,
                    number=row.attempts,
                    kind=row.kind,
                    model=row.model,
                    input=row.input,
                    max_attempts=row.max_attempts,
                    charged=row.attempts - row.interruptions,
                    deadline_s=row.deadline_s,
                    deadline_at=row.deadline_at,
                    priority=row.priority,
                )
            # Not claimable as it stands: a lease to take over, a deadline, a finished job...
        async with self._sessionmaker() as session, session.begin():
            job = await session.get(Job, job_id)
            if job is None or JobStatus(job.status).is_terminal:
                return None
            lease = job.lease_expires_at
            if job.status == JobStatus.RUNNING and lease is not None and lease > now:
                return Busy((lease - now).total_seconds())
            if job.status == JobStatus.RUNNING:
                await self._interrupt_attempt(session, job_id, job.attempts, now, "worker lost")
                seen_status = JobStatus.RUNNING
                interrupted = 1
            else:
                seen_status = JobStatus(job.status)
                interrupted = 0
            if job.cancel_requested_at is not None:
                # Its cancel came as it stopped running (the attempt failed, or its worker was
                # lost or stopping): it is not started again.
                cancelled = await session.execute(
                    update(Job)
                    .where(
                        Job.id == job_id, Job.status == seen_status, Job.attempts == job.attempts
                    )
                    .values(**cancelled_values(now), interruptions=Job.interruptions + interrupted)
                )
                if cancelled.rowcount != 1:  # type: ignore[attr-defined]
                    await session.rollback()  # another worker moved it first: leave it be
                    return None
                logger.info(
                    "job %s cancelled on request before attempt %d", job_id, job.attempts + 1
                )
                return None
            number = job.attempts + 1
            if job.deadline_at is not None and job.deadline_at <= now:
                await self._fail_past_deadline(session, job, seen_status, interrupted, now)
                return None
            if job.cached_from is not None and seen_status != JobStatus.RUNNING:
                # A follower (promptq.single_flight): it takes its leader's answer (or refusal),
                # or waits for it, or, when the leader did not settle, makes its own call.
                leader = await single_flight.leader_answer(session, job.cached_from)
                if leader is not None and leader.status in IN_FLIGHT:
                    return await single_flight.wait_longer(session, job, leader.id, now)
                if leader is not None and single_flight.settled(leader):
                    if await single_flight.take_outcome(session, job, seen_status, leader, now):
                        logger.info(
                            "job %s %s by identical job %s",
                            job_id,
                            "answered" if leader.status == JobStatus.SUCCEEDED else "refused",
                            job.cached_from,
                        )
                    else:
                        await session.rollback()
                    return None
                # No outcome to share: it runs itself and leads the other followers (below).
                # Those claimed at this moment take turns on the old leader's row; each then
                # finds itself re-pointed (the guard on `won`) instead of running too.
                old_leader_id = job.cached_from
                await single_flight.lock_leader(session, old_leader_id)
            else:
                old_leader_id = None
            charged = job.attempts - job.interruptions - interrupted + 1
            if charged > job.max_attempts:
                logger.warning("job %s has no attempts left but is %s", job_id, job.status)
                await session.rollback()
                return None
            still_as_seen = [
                Job.id == job_id,
                Job.status == seen_status,
                Job.attempts == job.attempts,
            ]
            if old_leader_id is not None:  # and not made to follow another follower meanwhile
                still_as_seen.append(Job.cached_from == old_leader_id)
            won = await session.execute(
                update(Job)
                .where(*still_as_seen)
                .values(
                    status=JobStatus.RUNNING,
                    attempts=number,
                    interruptions=Job.interruptions + interrupted,
                    started_at=func.coalesce(Job.started_at, now),
                    next_attempt_at=None,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    updated_at=now,
                    cached_from=None,  # a follower whose leader got no answer runs itself
                )
                # `job` stays as read: a follower that lost (below) waits as it was seen.
                .execution_options(synchronize_session=False)
            )
            if won.rowcount != 1:  # type: ignore[attr-defined]
                if old_leader_id is not None:
                    # Another follower of the old leader ran first and made this one follow it.
                    new_leader_id = await single_flight.new_leader(
                        session, job, seen_status, old_leader_id
                    )
                    if new_leader_id is not None:
                        return await single_flight.wait_longer(session, job, new_leader_id, now)
                await session.rollback()
                return None
            if old_leader_id is not None:
                led = await single_flight.lead_followers(session, job, old_leader_id, now)
                logger.info(
                    "job %s runs in place of job %s, which got no answer; %d jobs follow it now",
                    job_id,
                    old_leader_id,
                    led,
                )
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
                deadline_s=job.deadline_s,
                deadline_at=job.deadline_at,
                priority=job.priority,
            )

    async def _fail_past_deadline(
        self,
        session: AsyncSession,
        job: Job,
        seen_status: JobStatus,
        interrupted: int,
        now: datetime,
    ) -> None:
        """Fail a job whose deadline passed before its next attempt could start."""
        message = deadline_message(job.deadline_s, job.attempts - job.interruptions - interrupted)
        if job.error:
            message += f"; last error: {job.error}"
        failed = await session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == seen_status, Job.attempts == job.attempts)
            .values(
                status=JobStatus.FAILED,
                error=message,
                error_code=DEADLINE_EXCEEDED,
                interruptions=Job.interruptions + interrupted,
                next_attempt_at=None,
                lease_expires_at=None,
                finished_at=now,
                updated_at=now,
            )
        )
        if failed.rowcount != 1:  # type: ignore[attr-defined]
            await session.rollback()
            return
        logger.warning("job %s failed: %s", job.id, message)

    async def finish_attempt(
        self,
        claim: Claim,
        result: AttemptResult,
        *,
        job_status: JobStatus,
        next_attempt_at: datetime | None = None,
        job_error: tuple[str, str] | None = None,
        job_usage: tuple[int, int] | None = None,
    ) -> bool:
        """Close the attempt and move the job to `job_status`, if the claim still holds.

        `job_error` (message, code) overrides the error the job row gets from the attempt.
        `job_usage` (prompt, completion tokens) is the job's usage so far, written whatever the
        status (a summarize job's calls cost tokens even when the job then fails).
        Returns False when the job moved on without us (cancelled, or reclaimed elsewhere).
        """
        now = clock.now()
        result = _storable(result)
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
        elif job_error is not None:
            job_values |= {"error": job_error[0], "error_code": job_error[1]}
        elif result.error is not None:
            job_values |= {"error": result.error, "error_code": result.error_code}
        if job_status.is_terminal:
            job_values["finished_at"] = now
        if job_status == JobStatus.RETRYING:
            job_values["next_attempt_at"] = next_attempt_at
        if result.outcome == AttemptOutcome.INTERRUPTED:
            job_values["interruptions"] = Job.interruptions + 1
        if job_usage is not None and job_status != JobStatus.SUCCEEDED:
            job_values["prompt_tokens"], job_values["completion_tokens"] = job_usage
        # Going back to wait (retrying, queued): a cancel asked for meanwhile ends it instead.
        cancelled = None
        if not job_status.is_terminal:
            cancelled = cancelled_values(now)
            for carried in ("interruptions", "prompt_tokens", "completion_tokens"):
                if carried in job_values:
                    cancelled[carried] = job_values[carried]
        if self._fast is not None and self._fast.available:
            done = Outcome(
                outcome=result.outcome,
                status_code=result.status_code,
                error=result.error,
                latency_ms=result.latency_ms,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                result=result.result,
                finish_reason=result.finish_reason,
            )
            if job_status == JobStatus.SUCCEEDED:
                return await self._fast.succeed(claim.job_id, claim.number, now, done)
            return await self._fast.finish(
                claim.job_id, claim.number, now, done, job_values, cancelled
            )
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
            return await move_job(session, claim.job_id, claim.number, job_values, cancelled)

    @staticmethod
    async def _interrupt_attempt(
        session: AsyncSession, job_id: str, number: int, now: datetime, reason: str
    ) -> None:
        """Record attempt `number` (the one whose lease ran out) as interrupted, if still open;
        only that one: a newer attempt may be another worker's, alive."""
        await session.execute(
            update(JobAttempt)
            .where(
                JobAttempt.job_id == job_id,
                JobAttempt.number == number,
                JobAttempt.outcome == AttemptOutcome.RUNNING,
            )
            .values(outcome=AttemptOutcome.INTERRUPTED, finished_at=now, error=reason)
        )


#: What storable_text replaces: NUL, and any UTF-16 surrogate (never valid on its own in a str).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(text: str) -> str:
    """Text every database stores: NUL characters (which PostgreSQL refuses) and lone
    surrogates (which are not UTF-8) become U+FFFD. Model output goes through this."""
    if text.isascii():
        return text.replace("\x00", "\ufffd") if "\x00" in text else text
    return _UNSTORABLE.sub("\ufffd", text)


def _storable(result: AttemptResult) -> AttemptResult:
    """The attempt's model output and error as text every database stores (storable_text)."""
    return replace(
        result,
        result=None if result.result is None else storable_text(result.result),
        error=None if result.error is None else storable_text(result.error),
    )


def _deadline_at(start: datetime, deadline_s: float | None) -> datetime | None:
    return None if deadline_s is None else start + timedelta(seconds=deadline_s)


def deadline_message(deadline_s: float | None, charged: int) -> str:
    """The error of a job whose wall-clock budget ran out."""
    return (
        f"deadline exceeded: the job's deadline_s of {deadline_s or 0:g} s ran out "
        f"after {charged} charged attempt(s)"
    )
