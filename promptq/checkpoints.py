"""Checkpoints of summarize jobs: reads and conditional writes of `job_chunks`.

Every chunk summary is written as soon as its call returns, keyed on (job_id, level,
chunk_index, text_hash). A later attempt plans the same chunks, finds their summaries, and
never calls the model for them again. Writes are idempotent: a summary is stored once, a
finished row never goes back, and a second worker on the same job (a stale lease) can only add
valid summaries of the very same text.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, case, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from promptq import clock
from promptq.errors import ClaimLost
from promptq.models import ChunkStatus, Job, JobChunk, JobStatus
from promptq.schemas import Progress
from promptq.store import Claim

logger = logging.getLogger(__name__)

#: Rows a call may still (re)start or finish: everything but done and superseded.
_OPEN = (ChunkStatus.PENDING, ChunkStatus.RUNNING, ChunkStatus.FAILED, ChunkStatus.TRUNCATED)


@dataclass(frozen=True, slots=True)
class ChunkKey:
    """Identifies one call of a summarize job."""

    job_id: str
    level: int
    index: int
    text_hash: str


@dataclass(frozen=True, slots=True)
class SavedSummary:
    """A summary an earlier call (of this or an earlier attempt) finished."""

    summary: str
    prompt_tokens: int | None
    completion_tokens: int | None


class ChunkStore:
    """Plans, checkpoints and progress of summarize jobs."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker

    # -- the worker's side -----------------------------------------------------------------

    async def plan(
        self, claim: Claim, level: int, hashes: Sequence[str]
    ) -> dict[int, SavedSummary]:
        """Make `hashes` (in order) the calls of `level`, and return the finished ones by index.

        Rows of this level that are not in the plan, and every row above it, become superseded
        until a later plan names them again; so progress always describes the current plan.
        Truncated rows keep their status as evidence (progress never counts them).
        Raises ClaimLost when the attempt no longer owns the job.
        """
        now = clock.now()
        async with self._sessionmaker() as session, session.begin():
            await _hold_claim(session, claim)
            await session.execute(
                update(JobChunk)
                .where(
                    JobChunk.job_id == claim.job_id,
                    JobChunk.level >= level,
                    JobChunk.status.not_in([ChunkStatus.SUPERSEDED, ChunkStatus.TRUNCATED]),
                )
                .values(status=ChunkStatus.SUPERSEDED, updated_at=now)
            )
            rows = await session.execute(
                select(JobChunk).where(JobChunk.job_id == claim.job_id, JobChunk.level == level)
            )
            existing = {(r.chunk_index, r.text_hash): r for r in rows.scalars()}
            saved: dict[int, SavedSummary] = {}
            done_ids: list[int] = []
            open_ids: list[int] = []
            new_rows: list[dict[str, object]] = []
            for index, digest in enumerate(hashes):
                row = existing.get((index, digest))
                if row is None:
                    new_rows.append(
                        {
                            "job_id": claim.job_id,
                            "level": level,
                            "chunk_index": index,
                            "text_hash": digest,
                            "attempts": 0,
                            "status": ChunkStatus.PENDING,
                            "updated_at": now,
                        }
                    )
                elif row.summary is not None:
                    done_ids.append(row.id)
                    saved[index] = SavedSummary(
                        row.summary, row.prompt_tokens, row.completion_tokens
                    )
                else:
                    open_ids.append(row.id)
            for ids, status in ((done_ids, ChunkStatus.DONE), (open_ids, ChunkStatus.PENDING)):
                for batch in _batches(ids):
                    await session.execute(
                        update(JobChunk)
                        .where(JobChunk.id.in_(batch))
                        .values(status=status, updated_at=now)
                    )
            if new_rows:
                await session.execute(insert(JobChunk), new_rows)
        return saved

    async def start(self, key: ChunkKey) -> bool:
        """Count a call about to be made; False if the chunk is already done or superseded."""
        async with self._sessionmaker() as session, session.begin():
            result = await session.execute(
                update(JobChunk)
                .where(*_matches(key), JobChunk.status.in_(_OPEN))
                .values(
                    status=ChunkStatus.RUNNING,
                    attempts=JobChunk.attempts + 1,
                    updated_at=clock.now(),
                )
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def finish(
        self,
        key: ChunkKey,
        summary: str,
        *,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> bool:
        """Store a chunk's summary once; False if it was already stored or superseded."""
        async with self._sessionmaker() as session, session.begin():
            result = await session.execute(
                update(JobChunk)
                .where(*_matches(key), JobChunk.status.in_(_OPEN))
                .values(
                    status=ChunkStatus.DONE,
                    summary=summary,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    error=None,
                    updated_at=clock.now(),
                )
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def fail(
        self,
        key: ChunkKey,
        *,
        status: ChunkStatus,
        error: str,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> None:
        """Record why a call produced no summary (`failed` or `truncated`)."""
        async with self._sessionmaker() as session, session.begin():
            await session.execute(
                update(JobChunk)
                .where(*_matches(key), JobChunk.status == ChunkStatus.RUNNING)
                .values(
                    status=status,
                    error=error,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    updated_at=clock.now(),
                )
            )

    async def discard_truncated(
        self, job_id: str, level: int, *, min_prompt_tokens: int, error: str
    ) -> int:
        """Throw away the summaries of a level whose calls reported at least min_prompt_tokens
        (the size at which the model was seen cutting prompts); returns how many."""
        async with self._sessionmaker() as session, session.begin():
            result = await session.execute(
                update(JobChunk)
                .where(
                    JobChunk.job_id == job_id,
                    JobChunk.level == level,
                    JobChunk.status == ChunkStatus.DONE,
                    JobChunk.prompt_tokens >= min_prompt_tokens,
                )
                .values(
                    status=ChunkStatus.TRUNCATED,
                    summary=None,
                    error=error,
                    updated_at=clock.now(),
                )
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    async def saved(self, key: ChunkKey) -> SavedSummary | None:
        """The stored summary of one call, if there is one."""
        query = select(JobChunk).where(*_matches(key), JobChunk.summary.is_not(None))
        async with self._sessionmaker() as session:
            row = (await session.execute(query)).scalars().first()
        if row is None or row.summary is None:
            return None
        return SavedSummary(row.summary, row.prompt_tokens, row.completion_tokens)

    async def chunk_scale(self, job_id: str) -> float:
        """The fraction of the computed chunk size the job runs at (1 until shrunk)."""
        async with self._sessionmaker() as session:
            value = await session.scalar(select(Job.chunk_scale).where(Job.id == job_id))
        return 1.0 if value is None else float(value)

    async def set_chunk_scale(self, claim: Claim, scale: float) -> bool:
        """Persist a smaller chunk scale for the next attempt, if the claim still holds."""
        async with self._sessionmaker() as session, session.begin():
            result = await session.execute(
                update(Job)
                .where(*_claim_holds(claim))
                .values(chunk_scale=scale, updated_at=clock.now())
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def usage(self, job_id: str) -> tuple[int, int]:
        """Prompt and completion tokens of every call of the job that reported usage."""
        query = select(
            func.coalesce(func.sum(JobChunk.prompt_tokens), 0),
            func.coalesce(func.sum(JobChunk.completion_tokens), 0),
        ).where(JobChunk.job_id == job_id)
        async with self._sessionmaker() as session:
            prompt, completion = (await session.execute(query)).one()
        return int(prompt or 0), int(completion or 0)

    # -- readers ---------------------------------------------------------------------------

    async def progress(self, job_ids: Iterable[str]) -> dict[str, Progress]:
        """Progress of each job at its highest planned level (zeros before any plan)."""
        ids = list(job_ids)
        found = {job_id: Progress(chunks_done=0, chunks_total=0, level=0) for job_id in ids}
        if not ids:
            return found
        done = func.sum(case((JobChunk.status == ChunkStatus.DONE, 1), else_=0))
        query = (
            select(JobChunk.job_id, JobChunk.level, func.count(), done)
            .where(
                JobChunk.job_id.in_(ids),
                JobChunk.status.not_in([ChunkStatus.SUPERSEDED, ChunkStatus.TRUNCATED]),
            )
            .group_by(JobChunk.job_id, JobChunk.level)
        )
        async with self._sessionmaker() as session:
            for job_id, level, total, finished in await session.execute(query):
                if level >= found[job_id].level:
                    found[job_id] = Progress(
                        chunks_done=int(finished or 0), chunks_total=int(total), level=level
                    )
        return found

    async def list_chunks(self, job_id: str) -> list[JobChunk]:
        """Every row of a job, by level and index."""
        query = (
            select(JobChunk)
            .where(JobChunk.job_id == job_id)
            .order_by(JobChunk.level, JobChunk.chunk_index, JobChunk.id)
        )
        async with self._sessionmaker() as session:
            return list((await session.execute(query)).scalars())


def _matches(key: ChunkKey) -> tuple[ColumnElement[bool], ...]:
    return (
        JobChunk.job_id == key.job_id,
        JobChunk.level == key.level,
        JobChunk.chunk_index == key.index,
        JobChunk.text_hash == key.text_hash,
    )


def _claim_holds(claim: Claim) -> tuple[ColumnElement[bool], ...]:
    return (
        Job.id == claim.job_id,
        Job.status == JobStatus.RUNNING,
        Job.attempts == claim.number,
    )


async def _hold_claim(session: AsyncSession, claim: Claim) -> None:
    """Touch the job row under the claim's conditions (locking it until commit), or raise."""
    result = await session.execute(
        update(Job).where(*_claim_holds(claim)).values(updated_at=clock.now())
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise ClaimLost(f"attempt {claim.number} of job {claim.job_id} no longer owns it")


def _batches(ids: list[int], size: int = 500) -> Iterable[list[int]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]
