"""The result cache: an identical earlier request's stored answer instead of a model call.

Two prompt requests are identical when their kind, model, messages, params and fallback models
are; they then share `jobs.request_hash`. The fallback models are part of it because a job's
answer may come from one of them (worker.prompt_call): an answer that `fake-large` gave to a
request on `fake-small` with fallback `fake-large` must not answer a request on `fake-small`
alone. (The job row does not record which model answered, only its attempt rows do, so the
hash is what keeps them apart.) A request may reuse a stored result when it is deterministic
(temperature 0, or a seed) or asks for it (`cache: true`), unless it says `cache: false` or
`PROMPTQ_CACHE_ENABLED=false`. The cache is per owner: a key never gets another key's answer.
A hit is resolved at submit: its job is written already succeeded, with `cached_from` naming
the job whose answer it reused and 0 attempts, and never enters the queue. This holds for every
way prompt jobs come in: `POST /api/jobs`, `/v1/chat/completions`, and each item of a native or
OpenAI Batch API batch (looked up a thousand items per query). A request that misses may
still wait for an identical one in flight (`find_leaders`, see promptq.single_flight).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import orjson
from sqlalchemy import ColumnElement, Row, ScalarSelect, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from promptq.models import AttemptOutcome, Job, JobAttempt, JobKind, JobStatus

logger = logging.getLogger(__name__)


def request_hash(
    kind: str,
    model: str,
    messages: Any,
    params: dict[str, Any],
    fallback_models: Sequence[str] = (),
) -> str:
    """sha256 hex of what decides a model's answer: kind, model, messages, params and the
    fallback models that may answer instead of `model` (left out when there are none, so the
    hash of a request without them is what it always was)."""
    request: dict[str, Any] = {"kind": kind, "model": model, "messages": messages, "params": params}
    if fallback_models:
        request["fallback_models"] = list(fallback_models)
    canonical = orjson.dumps(request, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def is_deterministic(params: dict[str, Any]) -> bool:
    """True when the params ask for a reproducible answer: temperature 0 or a seed."""
    return params.get("temperature") == 0 or params.get("seed") is not None


def wants_cache(params: dict[str, Any], cache: bool | None, *, enabled: bool) -> bool:
    """Whether a request may reuse a stored answer: `cache` wins, else determinism decides."""
    if not enabled or cache is False:
        return False
    return cache is True or is_deterministic(params)


def prompt_hash(model: str, job_input: dict[str, Any]) -> str:
    """The request hash of a prompt job's input (`messages`, `params` and any
    `fallback_models`) on `model`."""
    return request_hash(
        JobKind.PROMPT,
        model,
        job_input["messages"],
        job_input["params"],
        job_input.get("fallback_models") or (),
    )


#: The statuses of a job still on its way to an answer.
IN_FLIGHT = (JobStatus.QUEUED, JobStatus.RETRYING, JobStatus.RUNNING)

#: What a cache hit copies from the job that answered.
ANSWER = (
    Job.id,
    Job.request_hash,
    Job.cached_from,
    Job.result,
    Job.finish_reason,
    Job.prompt_tokens,
    Job.completion_tokens,
)


def hit_values(source: Row[Any], now: datetime) -> dict[str, Any]:
    """The job columns of a cache hit answered by `source` (a job row with ANSWER's fields)."""
    return {
        "status": JobStatus.SUCCEEDED.value,
        "result": source.result,
        "finish_reason": source.finish_reason,
        "prompt_tokens": source.prompt_tokens,
        "completion_tokens": source.completion_tokens,
        "cached_from": source.cached_from or source.id,
        "started_at": now,
        "finished_at": now,
    }


def of_last_attempt(
    job: Job | type[Job], column: str, outcome: AttemptOutcome | None = None
) -> ScalarSelect[Any]:
    """`column` of the last attempt (with `outcome`, if given) of the job that made `job`'s
    outcome: itself, or for a cache hit or a follower its `cached_from`. `Job` itself gives a
    correlated column."""
    attempt = aliased(JobAttempt)
    query = select(getattr(attempt, column)).where(
        attempt.job_id == func.coalesce(job.cached_from, job.id)
    )
    if outcome is not None:
        query = query.where(attempt.outcome == outcome)
    return query.order_by(attempt.number.desc()).limit(1).scalar_subquery()


def answered_model(job: Job | type[Job]) -> ScalarSelect[Any]:
    """The model that made `job`'s answer (a fallback model, or its own)."""
    return of_last_attempt(job, "model", AttemptOutcome.SUCCEEDED)


def outcome_status_code(job: Job | type[Job]) -> ScalarSelect[Any]:
    """The HTTP status the model last gave for `job`'s request (for a follower that took a
    refusal, its leader's)."""
    return of_last_attempt(job, "status_code")


def same_requests(digests: Collection[str], owner_key_id: str | None) -> ColumnElement[bool]:
    """The prompt jobs of this owner (None: the local operator) with one of these hashes."""
    owner = Job.owner_key_id.is_(None) if owner_key_id is None else Job.owner_key_id == owner_key_id
    return Job.request_hash.in_(list(digests)) & owner & (Job.kind == JobKind.PROMPT)


async def find_many(
    conn: AsyncConnection, digests: Collection[str], owner_key_id: str | None
) -> dict[str, Row[Any]]:
    """The newest succeeded prompt job of this owner for each of `digests` that has one."""
    if not digests:
        return {}
    answered = same_requests(digests, owner_key_id) & (Job.status == JobStatus.SUCCEEDED)
    newest = select(func.max(Job.id)).where(answered)
    query = select(*ANSWER).where(Job.id.in_(newest.group_by(Job.request_hash)))
    rows: list[Row[Any]] = list(await conn.execute(query))
    return {row.request_hash: row for row in rows}


async def find_leaders(
    conn: AsyncConnection, digests: Collection[str], owner_key_id: str | None, *, priority: int
) -> dict[str, str]:
    """The oldest job in flight for each of `digests` that has one, which makes its own call
    and is at least as urgent as `priority`: {request hash: job id}."""
    if not digests:
        return {}
    query = (
        select(Job.request_hash, func.min(Job.id))
        .where(
            same_requests(digests, owner_key_id),
            Job.status.in_(IN_FLIGHT),
            Job.cached_from.is_(None),
            Job.cancel_requested_at.is_(None),
            Job.priority >= priority,
        )
        .group_by(Job.request_hash)
    )
    return {digest: leader for digest, leader in await conn.execute(query) if digest is not None}


class ResultCache:
    """Decides whether a prompt may reuse a stored answer, and finds it (one owner's jobs)."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], *, enabled: bool) -> None:
        self._sessionmaker = sessionmaker
        self.enabled = enabled

    def wants(self, params: dict[str, Any], cache: bool | None) -> bool:
        """Whether a request with these params and `cache` choice may reuse an answer."""
        return wants_cache(params, cache, enabled=self.enabled)

    async def lookup(
        self,
        model: str,
        job_input: dict[str, Any],
        cache: bool | None,
        owner_key_id: str | None,
        *,
        follow_at: int | None = None,
    ) -> Lookup:
        """The prompt's request hash, and the stored answer it may reuse; with `follow_at` (the
        new job's priority) and no answer, the identical job in flight it may wait for."""
        digest = prompt_hash(model, job_input)
        if not self.wants(job_input["params"], cache):
            return Lookup(digest)
        async with self._sessionmaker() as session:
            conn = await session.connection()
            answer = (await find_many(conn, [digest], owner_key_id)).get(digest)
            if answer is not None or follow_at is None:
                return Lookup(digest, answer)
            leaders = await find_leaders(conn, [digest], owner_key_id, priority=follow_at)
        return Lookup(digest, leader_id=leaders.get(digest))


class Lookup(NamedTuple):
    """What `ResultCache.lookup` found for a prompt."""

    digest: str
    #: A stored answer to reuse (a row with ANSWER's fields).
    answer: Row[Any] | None = None
    #: An identical job in flight whose answer to wait for (promptq.single_flight).
    leader_id: str | None = None
