"""The result cache: an identical earlier request's stored answer instead of a model call.

Two prompt requests are identical when their kind, model, messages and params are; they then
share `jobs.request_hash`. A request may reuse a stored result when it is deterministic
(temperature 0, or a seed) or asks for it (`cache: true`), unless it says `cache: false` or
`PROMPTQ_CACHE_ENABLED=false`. The cache is per owner: a key never gets another key's answer.
A hit is resolved at submit: its job is written already succeeded, with `cached_from` naming
the job whose answer it reused and 0 attempts, and never enters the queue.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from promptq.models import Job, JobKind, JobStatus

logger = logging.getLogger(__name__)


def request_hash(kind: str, model: str, messages: Any, params: dict[str, Any]) -> str:
    """sha256 hex of what decides a model's answer: kind, model, messages and params."""
    canonical = orjson.dumps(
        {"kind": kind, "model": model, "messages": messages, "params": params},
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).hexdigest()


def is_deterministic(params: dict[str, Any]) -> bool:
    """True when the params ask for a reproducible answer: temperature 0 or a seed."""
    return params.get("temperature") == 0 or params.get("seed") is not None


def wants_cache(params: dict[str, Any], cache: bool | None, *, enabled: bool) -> bool:
    """Whether a request may reuse a stored answer: `cache` wins, else determinism decides."""
    if not enabled or cache is False:
        return False
    return cache is True or is_deterministic(params)


class ResultCache:
    """Finds a stored answer for a request hash among one owner's succeeded prompt jobs."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker

    async def find(self, digest: str, owner_key_id: str | None) -> Job | None:
        """The newest succeeded prompt job of this owner with this request hash, if any."""
        owner = (
            Job.owner_key_id.is_(None)
            if owner_key_id is None
            else (Job.owner_key_id == owner_key_id)
        )
        query = (
            select(Job)
            .where(
                Job.request_hash == digest,
                owner,
                Job.status == JobStatus.SUCCEEDED,
                Job.kind == JobKind.PROMPT,
            )
            .order_by(Job.id.desc())
            .limit(1)
        )
        async with self._sessionmaker() as session:
            return (await session.execute(query)).scalar_one_or_none()
