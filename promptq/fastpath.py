"""The worker's two per-job writes, in one driver call each (or fewer, shared).

`JobStore.claim` and `JobStore.finish_attempt` run for every job, and through the ORM they
cost several CPU-ms per job: the identity map, the unit of work, building each statement and
its cache key, and on SQLite about nine hops to aiosqlite's thread per transaction. Here the
common cases are hand-written SQL, sent straight to the driver of a pooled connection:

* claim (a queued or retrying job with attempts left and time before its deadline, that
  waits for no identical job, see promptq.single_flight): one conditional
  `UPDATE ... RETURNING` takes the job and returns what the worker needs, and the attempt
  row is inserted in the same transaction. On PostgreSQL that is one statement (a
  data-modifying CTE, atomic on its own); on SQLite an UPDATE and an INSERT in aiosqlite's
  thread, in a transaction shared with the process's other claims and results of the moment
  (promptq.group_commit). (Claims on PostgreSQL stay one statement each: grouped like the
  results, they waited on one another and the zero-latency drain lost a fifth of its rate.)
  When nothing matches, `claim` returns None and
  `JobStore.claim` takes its general path, which handles every other case (an expired lease
  to take over, a passed deadline, no attempts left, a follower, a finished or missing job).
* succeed: the attempt row and the job row, in one transaction; the job row moves only if
  the claim still holds (status running, same attempt number), so a late or duplicate attempt
  cannot overwrite a result. Successes that come together share the transaction (a
  promptq.group_commit.GroupCommit): on PostgreSQL one statement over arrays of their values
  (if it fails, each is written on its own so that each gets its own answer), on SQLite one
  transaction with a savepoint each. One write at a time per process: a result whose job
  row another transaction holds locked makes the next ones wait until it is let go.

The conditions are the same as the general path's, so the guarantees are too; the store's
tests run through this module. Values go through the columns' own SQLAlchemy type
processors, so rows look exactly as the ORM writes them. A driver error that means "the
database is away" is raised as SQLAlchemy's OperationalError (see promptq.db.is_db_unavailable)
and the connection is dropped from the pool.

It needs `UPDATE ... RETURNING` (SQLite >= 3.35) and the aiosqlite or asyncpg driver;
otherwise `available` is False and the store keeps to its general path.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import asyncpg
from sqlalchemy import CursorResult, Table, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import greenlet_spawn

from promptq.db import is_db_unavailable
from promptq.group_commit import GroupCommit, Settled, Write, sqlite_writes
from promptq.models import AttemptOutcome, Job, JobAttempt, JobStatus, JSONType, UTCDateTime

#: SQLite: take a claimable job (parameters: now, lease, id).
_SQLITE_CLAIM = """
UPDATE jobs SET status = 'running', attempts = attempts + 1,
    started_at = COALESCE(started_at, :now), next_attempt_at = NULL,
    lease_expires_at = :lease, updated_at = :now
WHERE id = :id AND status IN ('queued', 'retrying')
  AND (deadline_at IS NULL OR deadline_at > :now)
  AND attempts - interruptions < max_attempts AND cancel_requested_at IS NULL
  AND cached_from IS NULL
RETURNING kind, model, input, attempts, interruptions, max_attempts, deadline_s, deadline_at,
    priority
"""
_SQLITE_OPEN_ATTEMPT = """
INSERT INTO job_attempts (job_id, number, started_at, outcome, worker, model)
VALUES (:id, :number, :now, 'running', :worker, :model)
"""
_SQLITE_CLOSE_ATTEMPT = """
UPDATE job_attempts SET outcome = :outcome, finished_at = :now, status_code = :status_code,
    error = :error, latency_ms = :latency_ms, prompt_tokens = :prompt_tokens,
    completion_tokens = :completion_tokens
WHERE job_id = :id AND number = :number AND outcome = 'running'
"""
_SQLITE_SUCCEED_JOB = """
UPDATE jobs SET status = 'succeeded', updated_at = :now, finished_at = :now,
    lease_expires_at = NULL, result = :result, finish_reason = :finish_reason,
    prompt_tokens = :prompt_tokens, completion_tokens = :completion_tokens,
    error = NULL, error_code = NULL
WHERE id = :id AND status = 'running' AND attempts = :number
"""

#: A job waiting to run: its model, kind, priority and (a prompt job's only) input.
_SQLITE_WAITING = """
SELECT model, kind, priority, CASE WHEN kind = 'prompt' THEN input END FROM jobs
WHERE id = :id AND status IN ('queued', 'retrying') AND cached_from IS NULL
"""
_PG_WAITING = """
SELECT model, kind, priority, CASE WHEN kind = 'prompt' THEN input END FROM jobs
WHERE id = $1 AND status IN ('queued', 'retrying') AND cached_from IS NULL
"""

#: PostgreSQL: take a claimable job and open its attempt ($1 now, $2 lease, $3 id, $4 worker).
_PG_CLAIM = """
WITH claimed AS (
    UPDATE jobs SET status = 'running', attempts = attempts + 1,
        started_at = COALESCE(started_at, $1), next_attempt_at = NULL,
        lease_expires_at = $2, updated_at = $1
    WHERE id = $3 AND status IN ('queued', 'retrying')
      AND (deadline_at IS NULL OR deadline_at > $1)
      AND attempts - interruptions < max_attempts AND cancel_requested_at IS NULL
      AND cached_from IS NULL
    RETURNING id, kind, model, input, attempts, interruptions, max_attempts, deadline_s,
              deadline_at, priority
), opened AS (
    INSERT INTO job_attempts (job_id, number, started_at, outcome, worker, model)
    SELECT id, attempts, $1, 'running', $4::varchar, model FROM claimed
)
SELECT kind, model, input, attempts, interruptions, max_attempts, deadline_s, deadline_at,
       priority
FROM claimed
"""
#: PostgreSQL: close the attempt and record the success ($1 now, $2 outcome, $3 status code,
#: $4 error, $5 latency, $6/$7 tokens, $8 result, $9 finish reason, $10 id, $11 number).
_PG_SUCCEED = """
WITH closed AS (
    UPDATE job_attempts SET outcome = $2, finished_at = $1, status_code = $3, error = $4,
        latency_ms = $5, prompt_tokens = $6, completion_tokens = $7
    WHERE job_id = $10 AND number = $11 AND outcome = 'running'
)
UPDATE jobs SET status = 'succeeded', updated_at = $1, finished_at = $1,
    lease_expires_at = NULL, result = $8, finish_reason = $9, prompt_tokens = $6,
    completion_tokens = $7, error = NULL, error_code = NULL
WHERE id = $10 AND status = 'running' AND attempts = $11
"""

#: PostgreSQL: _PG_SUCCEED for many attempts at once, one array per column ($1 job ids,
#: $2 numbers, $3 times, then as _PG_SUCCEED's $2-$9); returns the (id, attempt) of each job
#: row that moved.
_PG_SUCCEED_MANY = """
WITH given AS (
    SELECT * FROM unnest($1::varchar[], $2::int[], $3::timestamptz[], $4::varchar[], $5::int[],
                         $6::text[], $7::int[], $8::int[], $9::int[], $10::text[], $11::varchar[])
        AS g(id, number, now, outcome, status_code, error, latency_ms, prompt_tokens,
             completion_tokens, result, finish_reason)
), closed AS (
    UPDATE job_attempts a SET outcome = g.outcome, finished_at = g.now,
        status_code = g.status_code, error = g.error, latency_ms = g.latency_ms,
        prompt_tokens = g.prompt_tokens, completion_tokens = g.completion_tokens
    FROM given g
    WHERE a.job_id = g.id AND a.number = g.number AND a.outcome = 'running'
)
UPDATE jobs j SET status = 'succeeded', updated_at = g.now, finished_at = g.now,
    lease_expires_at = NULL, result = g.result, finish_reason = g.finish_reason,
    prompt_tokens = g.prompt_tokens, completion_tokens = g.completion_tokens, error = NULL,
    error_code = NULL
FROM given g
WHERE j.id = g.id AND j.status = 'running' AND j.attempts = g.number
RETURNING j.id, j.attempts
"""


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    """The job fields a successful fast claim returns."""

    kind: str
    model: str
    input: dict[str, Any]
    attempts: int
    interruptions: int
    max_attempts: int
    deadline_s: float | None
    deadline_at: datetime | None
    priority: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a finished attempt writes to its attempt row (and, on success, the job row)."""

    outcome: AttemptOutcome
    status_code: int | None
    error: str | None
    latency_ms: int | None
    prompt_tokens: int | None
    completion_tokens: int | None
    result: str | None = None
    finish_reason: str | None = None


class FastPath:
    """Claim and succeed in one driver call each, or fewer (see the module docstring)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        dialect = engine.dialect
        self.postgres = dialect.name == "postgresql" and dialect.driver == "asyncpg"
        sqlite = dialect.name == "sqlite" and dialect.driver == "aiosqlite"
        self.available = self.postgres or (sqlite and sqlite3.sqlite_version_info >= (3, 35))
        #: SQLite: claims and results go through one shared transaction at a time.
        self._sqlite_writes: GroupCommit[tuple[Write, dict[str, Any]]] = GroupCommit(
            sqlite_writes(self._driver)
        )
        #: PostgreSQL: the successes of jobs that end together are written in one statement.
        self._pg_results: GroupCommit[_Success] = GroupCommit(self._pg_succeed_many)
        self._bind_time: Callable[[Any], Any] = _processor(
            UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
        )
        self._read_time: Callable[[Any], Any] = _processor(
            UTCDateTime().dialect_impl(dialect).result_processor(dialect, None)
        )
        self._read_json: Callable[[Any], Any] = _processor(
            JSONType.dialect_impl(dialect).result_processor(dialect, None)
        )

    @contextlib.asynccontextmanager
    async def _driver(self) -> AsyncIterator[Any]:
        """A pooled connection's driver connection (aiosqlite or asyncpg).

        Taken from the pool as a raw connection: a SQLAlchemy `AsyncConnection` around it
        would cost more than twice as much CPU per checkout, for nothing used here.
        """
        pooled = await self.engine.raw_connection()
        try:
            yield pooled.driver_connection
        except BaseException as exc:
            # Back to the pool (closed, if the database went away), even if cancelled again.
            await asyncio.shield(greenlet_spawn(_give_back, pooled, exc))
            if isinstance(exc, DRIVER_ERRORS) and _database_away(exc):
                raise OperationalError("promptq fast path", None, exc) from exc
            raise
        await greenlet_spawn(pooled.close)

    async def claim(
        self, job_id: str, *, worker: str, now: datetime, lease_s: float
    ) -> ClaimedRow | None:
        """Take a claimable job and open its attempt; None when the general path must decide."""
        lease = now + timedelta(seconds=lease_s)
        if self.postgres:
            async with self._driver() as driver:
                pg_row = await driver.fetchrow(_PG_CLAIM, now, lease, job_id, worker)
            return None if pg_row is None else ClaimedRow(*pg_row)
        params = {
            "id": job_id,
            "now": self._bind_time(now),
            "lease": self._bind_time(lease),
            "worker": worker,
        }
        row = await self._sqlite_writes.run((_sqlite_claim, params))
        if row is None:
            return None
        kind, model, input_, attempts, interruptions, max_attempts, deadline_s, deadline, prio = row
        return ClaimedRow(
            kind,
            model,
            self._read_json(input_),
            attempts,
            interruptions,
            max_attempts,
            deadline_s,
            self._read_time(deadline),
            prio,
        )

    async def waiting(self, job_id: str) -> tuple[str, str, int, dict[str, Any] | None] | None:
        """(model, kind, priority, input if a prompt job) of a job waiting to run, else None."""
        async with self._driver() as driver:
            if self.postgres:
                row = await driver.fetchrow(_PG_WAITING, job_id)
            else:
                async with driver.execute(_SQLITE_WAITING, {"id": job_id}) as cursor:
                    row = await cursor.fetchone()
        if row is None:
            return None
        model, kind, priority, input_ = row
        return model, kind, priority, input_ if self.postgres else self._read_json(input_)

    async def succeed(self, job_id: str, number: int, now: datetime, done: Outcome) -> bool:
        """Close the attempt as succeeded and store the result, if the claim still holds."""
        if self.postgres:
            return bool(await self._pg_results.run((job_id, number, now, done)))
        params = {
            "id": job_id,
            "number": number,
            "now": self._bind_time(now),
            "outcome": done.outcome.value,
            "status_code": done.status_code,
            "error": done.error,
            "latency_ms": done.latency_ms,
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "result": done.result,
            "finish_reason": done.finish_reason,
        }
        return bool(await self._sqlite_writes.run((_sqlite_succeed, params)))

    async def _pg_succeed_many(self, given: list[_Success]) -> list[Settled]:
        """The flush of `_pg_results`: every success in one statement; whether each moved."""
        if len(given) == 1:
            return [(True, await self._pg_succeed(*given[0]))]
        firsts: dict[tuple[str, int], int] = {}  # a repeat finds the job moved: False
        for index, (job_id, number, _, _) in enumerate(given):
            firsts.setdefault((job_id, number), index)
        rows = [
            (job_id, number, now, *_success_values(done))
            for index, (job_id, number, now, done) in enumerate(given)
            if firsts[(job_id, number)] == index
        ]
        columns = [list(column) for column in zip(*rows, strict=True)]
        try:
            async with self._driver() as driver:
                moved = {tuple(row) for row in await driver.fetch(_PG_SUCCEED_MANY, *columns)}
        except OperationalError:
            raise  # the database is away: every success waits for it
        except Exception:  # one bad value fails the statement: give each its own answer
            return [await _settle(self._pg_succeed(*success)) for success in given]
        return [
            (True, firsts[(job_id, number)] == index and (job_id, number) in moved)
            for index, (job_id, number, _, _) in enumerate(given)
        ]

    async def _pg_succeed(self, job_id: str, number: int, now: datetime, done: Outcome) -> bool:
        async with self._driver() as driver:
            status = await driver.execute(_PG_SUCCEED, now, *_success_values(done), job_id, number)
        return bool(status == "UPDATE 1")

    async def finish(
        self,
        job_id: str,
        number: int,
        now: datetime,
        done: Outcome,
        job_values: dict[str, Any],
        cancelled: dict[str, Any] | None = None,
    ) -> bool:
        """Close the attempt and move the job to any status (rarer: through SQLAlchemy Core);
        `cancelled` as in `move_job`."""
        attempt = (
            update(cast(Table, JobAttempt.__table__))
            .where(
                JobAttempt.job_id == job_id,
                JobAttempt.number == number,
                JobAttempt.outcome == AttemptOutcome.RUNNING,
            )
            .values(
                outcome=done.outcome.value,
                finished_at=now,
                status_code=done.status_code,
                error=done.error,
                latency_ms=done.latency_ms,
                prompt_tokens=done.prompt_tokens,
                completion_tokens=done.completion_tokens,
            )
        )
        async with self.engine.begin() as conn:
            await conn.execute(attempt)
            return await move_job(conn, job_id, number, job_values, cancelled)


async def move_job(
    db: AsyncConnection | AsyncSession,
    job_id: str,
    number: int,
    job_values: dict[str, Any],
    cancelled: dict[str, Any] | None,
) -> bool:
    """Move a job whose claim still holds (running, attempt `number`) to `job_values`; False
    if it moved on without us.

    With `cancelled` (the job goes back to wait: retrying, queued), a job whose cancel was
    asked for meanwhile gets those values instead, and the answer is False too: it must not
    come back (the cancel found it running, and its worker may not have heard of it).
    """
    jobs = cast(Table, Job.__table__)
    held = (Job.id == job_id, Job.status == JobStatus.RUNNING, Job.attempts == number)
    if cancelled is None:
        moved = await db.execute(update(jobs).where(*held).values(**job_values))
        return cast(CursorResult[Any], moved).rowcount == 1
    moved = await db.execute(
        update(jobs).where(*held, Job.cancel_requested_at.is_(None)).values(**job_values)
    )
    if cast(CursorResult[Any], moved).rowcount == 1:
        return True
    await db.execute(
        update(jobs).where(*held, Job.cancel_requested_at.is_not(None)).values(**cancelled)
    )
    return False


#: A success to write: job id, attempt number, when, what.
_Success = tuple[str, int, datetime, Outcome]


def _success_values(done: Outcome) -> tuple[Any, ...]:
    """The attempt's values in _PG_SUCCEED's order ($2-$9)."""
    return (
        done.outcome.value,
        done.status_code,
        done.error,
        done.latency_ms,
        done.prompt_tokens,
        done.completion_tokens,
        done.result,
        done.finish_reason,
    )


async def _settle(call: Awaitable[Any]) -> Settled:
    """(True, what `call` returns) or (False, what it raises)."""
    try:
        return (True, await call)
    except Exception as exc:
        return (False, exc)


def _processor(fn: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    return fn if fn is not None else (lambda value: value)


def _sqlite_claim(db: sqlite3.Connection, params: dict[str, Any]) -> tuple[Any, ...] | None:
    """In aiosqlite's thread: the claim UPDATE and, if it took the job, the attempt INSERT."""
    row: tuple[Any, ...] | None = db.execute(_SQLITE_CLAIM, params).fetchone()
    if row is not None:
        db.execute(_SQLITE_OPEN_ATTEMPT, {**params, "number": row[3], "model": row[1]})
    return row


def _sqlite_succeed(db: sqlite3.Connection, params: dict[str, Any]) -> bool:
    """In aiosqlite's thread: close the attempt, then move the job if the claim holds."""
    db.execute(_SQLITE_CLOSE_ATTEMPT, params)
    return bool(db.execute(_SQLITE_SUCCEED_JOB, params).rowcount == 1)


#: What the drivers raise (translated by `_driver` when it means "the database is away").
DRIVER_ERRORS = (sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


def _database_away(exc: BaseException) -> bool:
    away = isinstance(exc, sqlite3.OperationalError | asyncpg.InterfaceError | OSError)
    return away or is_db_unavailable(exc)


def _give_back(pooled: PoolProxiedConnection, exc: BaseException) -> None:
    """In a greenlet: return a connection after an error, dropping it if the database went
    away ("locked"/"busy" from SQLite leave it usable)."""
    usable = isinstance(exc, sqlite3.OperationalError)
    if isinstance(exc, DRIVER_ERRORS) and _database_away(exc) and not usable:
        with contextlib.suppress(Exception):
            pooled.invalidate(exc)
    pooled.close()
