"""Single flight: identical requests in flight make one model call between them.

The result cache (promptq.cache) answers a request that repeats one already answered. This
covers the repeats that come while the first is still on its way: a prompt job that may reuse
an answer but finds none stored, while an identical request of the same owner is queued,
retrying or running (and at least as urgent), is written as that job's *follower*: queued,
with `cached_from` naming the job whose answer it waits for, its *leader*. Within one batch,
the first of identical items leads the others. This holds for `POST /api/jobs` and for each
item of a native or OpenAI Batch API batch. Chat completions (`/v1/chat/completions`) never
follow: a caller waiting on the line should not wait on another request's retries too.

A follower is queued and delivered like any job, so at-least-once delivery is unchanged; its
claim (`JobStore.claim`, general path: the fast path takes no follower) decides what it does:
* its leader succeeded: it is written succeeded with the leader's answer, 0 attempts, like a
  cache hit at submit (`cached_from` then names the job that made the call);
* its leader failed because the model refused the request itself (its last attempt a permanent
  error, such as a 400): it is written failed with the same error and error code, 0 attempts,
  without a call, since the identical request would be refused alike (`settled`);
* its leader is still on its way: it is not claimed (`Following`), and the worker puts it back
  on the queue to look again later (`recheck_s`, and before its deadline; its
  `next_attempt_at` says when), or as soon as the leader is done (worker.followers);
* its leader was cancelled, ran out of retries or past its deadline, or is gone: it is claimed
  and makes its own call, its `cached_from` is cleared, and the other followers of that job
  still waiting (and no more urgent) now follow it (`lead_followers`): one call for them all,
  not one each. Followers claimed at the same moment take turns on the old leader's row, and
  each finds it follows the first (`new_leader`) and waits. At worst (a follower's row busy at
  that very moment, or a deleted leader: no row to take turns on) a few of them run. Never a
  follower of itself, nor a cycle: the one led to runs, its `cached_from` cleared. If it does
  not settle either, one of its followers leads the rest in turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from promptq.cache import ANSWER, find_leaders, hit_values, of_last_attempt
from promptq.models import AttemptOutcome, Job, JobStatus

#: A follower whose leader is in flight looks again after a quarter of its age, at least
#: RECHECK_MIN_S and at most RECHECK_MAX_S: often at first, rarely when the leader is slow (in
#: a backlog it comes back after the jobs queued before it anyway).
RECHECK_MIN_S = 0.25
RECHECK_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class Following:
    """Not claimed: the job waits for the answer of `leader_id`, an identical job in flight,
    and looks again in `retry_in_s` (sooner if woken: worker.followers); `priority` is its own."""

    leader_id: str
    retry_in_s: float
    priority: int


def recheck_s(age_s: float) -> float:
    """How long a follower `age_s` old waits before it looks at its leader again."""
    return min(max(age_s / 4, RECHECK_MIN_S), RECHECK_MAX_S)


async def follow_leaders(
    conn: AsyncConnection, rows: list[dict[str, Any]], owner_key_id: str | None, *, priority: int
) -> int:
    """Make each new job row that has an identical job in flight, or an identical row before
    it, follow that one (in place); how many follow. The rows may all reuse an answer."""
    leaders = await find_leaders(
        conn, {row["request_hash"] for row in rows}, owner_key_id, priority=priority
    )
    following = 0
    for row in rows:
        leader = leaders.setdefault(row["request_hash"], row["id"])
        if leader != row["id"]:
            row["cached_from"] = leader
            following += 1
    return following


async def leader_answer(session: AsyncSession, leader_id: str) -> Row[Any] | None:
    """The leader's status, answer (ANSWER's fields) and error, and `refused`: whether its last
    attempt ended in a permanent error (the model refused the request itself, e.g. a 400);
    None if it is gone."""
    refused = (of_last_attempt(Job, "outcome") == AttemptOutcome.PERMANENT_ERROR).label("refused")
    query = select(Job.status, Job.error, Job.error_code, refused, *ANSWER).where(
        Job.id == leader_id
    )
    rows: list[Row[Any]] = list(await session.execute(query))
    return rows[0] if rows else None


def settled(leader: Row[Any]) -> bool:
    """Whether a leader's outcome is its followers' too: an answer, or a refusal of the request
    itself. (Cancelled, past its deadline or out of retries, it says nothing about theirs.)"""
    if leader.status == JobStatus.SUCCEEDED:
        return True
    return bool(leader.status == JobStatus.FAILED and leader.refused)


async def wait_longer(session: AsyncSession, job: Job, leader_id: str, now: datetime) -> Following:
    """Set when the follower `job` looks at its leader again (before its deadline, if any)."""
    retry_in_s = recheck_s((now - job.created_at).total_seconds())
    if job.deadline_at is not None:
        left_s = (job.deadline_at - now).total_seconds()
        retry_in_s = min(retry_in_s, max(left_s / 2, RECHECK_MIN_S))
    # The reconciler would bring a job forward that arq has later than its next_attempt_at.
    await session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == job.status, Job.attempts == job.attempts)
        .values(next_attempt_at=now + timedelta(seconds=retry_in_s))
    )
    return Following(leader_id, retry_in_s, job.priority)


async def take_outcome(
    session: AsyncSession, job: Job, seen_status: JobStatus, leader: Row[Any], now: datetime
) -> bool:
    """Write the follower `job` with its `settled` leader's outcome (succeeded with its answer,
    or failed with its refusal, without a call of its own), if it is still as seen and not
    being cancelled; whether it was."""
    if leader.status == JobStatus.SUCCEEDED:
        outcome = hit_values(leader, now)
    else:
        outcome = {
            "status": JobStatus.FAILED.value,
            "error": leader.error,
            "error_code": leader.error_code,
            "cached_from": leader.id,
            "finished_at": now,
        }
    answered = await session.execute(
        update(Job)
        .where(
            Job.id == job.id,
            Job.status == seen_status,
            Job.attempts == job.attempts,
            Job.cancel_requested_at.is_(None),
        )
        # It is done: nothing is due any more (`wait_longer` set when it would look again).
        .values(updated_at=now, next_attempt_at=None, lease_expires_at=None, **outcome)
    )
    return bool(answered.rowcount == 1)  # type: ignore[attr-defined]


async def lock_leader(session: AsyncSession, leader_id: str) -> None:
    """Hold the row of a leader that got no answer until the transaction ends (PostgreSQL;
    SQLite writes one transaction at a time anyway): its followers claimed at the same moment
    take turns, so the first leads the others (`lead_followers`) before they look again."""
    await session.execute(select(Job.id).where(Job.id == leader_id).with_for_update())


async def lead_followers(session: AsyncSession, job: Job, old_leader_id: str, now: datetime) -> int:
    """Make the followers of `old_leader_id` still waiting follow `job` instead (it now runs in
    that job's place); how many. Only those at most as urgent as `job` (a follower never waits
    for a less urgent job), and not rows another transaction holds at this moment (PostgreSQL:
    skipped, not waited for, so that two followers leading at once cannot deadlock; a skipped
    one runs itself)."""
    waiting = (
        select(Job.id)
        .where(
            Job.request_hash == job.request_hash,  # followers share it: indexed, unlike cached_from
            Job.cached_from == old_leader_id,
            Job.status.in_((JobStatus.QUEUED, JobStatus.RETRYING)),
            Job.cancel_requested_at.is_(None),
            Job.priority <= job.priority,
            Job.id != job.id,
        )
        .with_for_update(skip_locked=True)
    )
    led = await session.execute(
        update(Job)
        .where(Job.id.in_(waiting))
        .values(cached_from=job.id, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(led.rowcount)  # type: ignore[attr-defined]


async def new_leader(
    session: AsyncSession, job: Job, seen_status: JobStatus, old_leader_id: str
) -> str | None:
    """The job that the follower `job` of `old_leader_id` was made to follow meanwhile (by
    another follower's `lead_followers`), if it still waits as seen; None otherwise."""
    query = select(Job.cached_from).where(
        Job.id == job.id, Job.status == seen_status, Job.attempts == job.attempts
    )
    leader_id: str | None = (await session.execute(query)).scalar_one_or_none()
    return leader_id if leader_id != old_leader_id else None
