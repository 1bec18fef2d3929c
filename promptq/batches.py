"""Batches: create many jobs in one go, and read a batch back (counts, results, comparison).

`BatchService.create` is the one way batches are made: by `POST /api/batches`, the CLI and the
OpenAI Batch API alike. It takes items that are already valid (see promptq.batch_items) and

1. inserts the `batches` row and the jobs in one transaction, a thousand rows per INSERT
   (SQLAlchemy Core executemany), never building ORM objects, so memory stays flat; a prompt
   item that may reuse a stored answer (promptq.cache) and has one is written already
   succeeded, from one lookup per thousand items; one that has none but repeats a request
   in flight, or an earlier item, waits for that one's answer (promptq.single_flight);
2. after the commit, queues the other jobs through Redis pipelines (promptq.bulk_queue).

Jobs saved but not queued because Redis is down stay `queued` in SQL; the reconciler queues
them. Counts per status are aggregated from `jobs` with one GROUP BY, never stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from operator import itemgetter
from typing import Any

import orjson
from sqlalchemy import (
    Row,
    Select,
    Table,
    Text,
    and_,
    bindparam,
    case,
    cast,
    func,
    insert,
    literal,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from promptq import clock
from promptq.batch_items import ItemSpec
from promptq.batch_schemas import (
    BatchCounts,
    BatchOut,
    BatchUsage,
    ComparePage,
    CompareRow,
    ModelAnswer,
    ModelSummary,
)
from promptq.bulk_queue import enqueue_many
from promptq.cache import IN_FLIGHT, find_many, hit_values, prompt_hash
from promptq.errors import IdempotencyConflict, NotFound, ServiceUnavailable
from promptq.models import (
    Batch,
    BatchStatus,
    Job,
    JobAttempt,
    JobKind,
    JobStatus,
    Priority,
    UTCDateTime,
)
from promptq.service import JobService
from promptq.single_flight import follow_leaders

logger = logging.getLogger(__name__)

#: Rows per INSERT statement (and per idempotency-key lookup).
INSERT_CHUNK = 1000
#: Jobs read per query when streaming a batch's results.
RESULTS_PAGE = 500
#: Characters of an item's prompt a comparison shows.
PROMPT_PREVIEW_CHARS = 200
_ID_CHARS = 36
#: Batch statuses that may still change as their jobs run.
OPEN_STATUSES = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)

_JOBS: Table = Job.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class BatchCreated:
    """What `BatchService.create` did."""

    batch: Batch
    #: Jobs inserted.
    created: int
    #: Items whose idempotency_key named an existing identical job (not inserted again).
    reused: int
    #: Jobs answered from the result cache (created already succeeded, never queued).
    cached: int
    #: Jobs queued to wait for an identical job's answer (promptq.single_flight).
    following: int
    #: Jobs put on the Redis queue now (the reconciler queues the rest if Redis was down).
    enqueued: int
    #: Every item reused a job of one earlier batch, made the same way: `batch` is that
    #: batch, sent again (say, after a timeout), and nothing was created.
    replayed: bool = False


class _Replayed(Exception):
    """Rolls back a batch whose items all belong to the earlier batch `batch_id`."""

    def __init__(self, batch_id: str) -> None:
        self.batch_id = batch_id


def owned_batches(owned_by: str | None) -> Select[Batch]:
    """SELECT the batches that key id owns; every batch for None (an admin)."""
    query = select(Batch)
    return query if owned_by is None else query.where(Batch.owner_key_id == owned_by)


class BatchService:
    """Create batches and read them back. Built per use from a JobService (no state)."""

    def __init__(self, service: JobService) -> None:
        self.service = service
        self.settings = service.settings
        self.sessionmaker = service.store.sessionmaker

    # -- creating --------------------------------------------------------------------------

    async def create(
        self,
        items: Iterable[ItemSpec] | AsyncIterable[ItemSpec],
        *,
        owner_key_id: str | None,
        name: str | None = None,
        models: list[str] | None = None,
        api: str = "native",
        metadata: dict[str, Any] | None = None,
        status: BatchStatus = BatchStatus.IN_PROGRESS,
        expires_at: datetime | None = None,
        priority: int = Priority.BULK,
        enqueue: bool = True,
    ) -> BatchCreated:
        """Insert a batch of validated items in one transaction, then queue its jobs.

        With `models`, each item becomes one job per model, all at the item's batch_index
        (a comparison batch); an item's own `model` is then ignored. An item with an
        idempotency_key that the owner already used for the same request keeps that job
        (counted as reused); for a different request the whole batch is refused
        (IdempotencyConflict) and nothing is created. In a comparison batch the key of each
        model's job is `<key>:<model>`. A batch whose every item reuses a job of one earlier
        batch of the owner, made the same way (the same API, models and size), is that batch
        sent again: nothing is created, and the earlier batch is the answer (`replayed`).
        """
        now = clock.now()
        started = time.perf_counter()
        batch = Batch(
            id=clock.new_id(),
            api=api,
            name=name,
            status=status,
            job_count=0,
            models=models,
            metadata_=metadata,
            owner_key_id=owner_key_id,
            created_at=now,
            updated_at=now,
            expires_at=expires_at,
        )
        cache = self.service.cache
        ids = bytearray()  # the queued ids, 36 ASCII bytes each: 3.6 MB for 100k jobs
        created = reused = cached = following = 0
        reused_from: set[str | None] = set()  # the batches of the reused jobs
        try:
            async with self.sessionmaker() as session, session.begin():
                session.add(batch)
                await session.flush()
                conn = await session.connection()
                statement = _insert_jobs(conn.dialect.name)
                shared = {  # the same in every row
                    "status": JobStatus.QUEUED.value,
                    "attempts": 0,
                    "interruptions": 0,
                    "owner_key_id": owner_key_id,
                    "batch_id": batch.id,
                    "priority": priority,
                    "created_at": now,
                    "updated_at": now,
                } | dict.fromkeys(_ANSWER_KEYS)
                index = 0
                async for chunk in _chunks(items, INSERT_CHUNK):
                    rows: list[dict[str, Any]] = []
                    cacheable: set[str] = set()  # ids of the rows that may reuse an answer
                    for spec in chunk:
                        new = list(self._rows(spec, index, models, shared, now))
                        rows.extend(new)
                        if spec.kind == JobKind.PROMPT and cache.wants(
                            spec.input["params"], spec.cache
                        ):
                            cacheable.update(row["id"] for row in new)
                        index += 1
                    fresh = await _drop_reused(conn, rows, owner_key_id, reused_from)
                    reused += len(rows) - len(fresh)
                    if not fresh:
                        continue
                    may_reuse = [row for row in fresh if row["id"] in cacheable]
                    cached += await _answer_from_cache(conn, may_reuse, owner_key_id, now)
                    following += await follow_leaders(
                        conn,
                        [row for row in may_reuse if row["status"] == JobStatus.QUEUED.value],
                        owner_key_id,
                        priority=priority,
                    )
                    await _insert(conn, statement, fresh)
                    created += len(fresh)
                    for row in fresh:
                        if row["status"] == JobStatus.QUEUED.value:
                            ids.extend(row["id"].encode())
                batch.job_count = created
                if not created and len(reused_from) == 1:
                    await _raise_if_replayed(session, batch, reused_from.pop(), reused)
        except _Replayed as replay:
            logger.info("batch %s sent again: %d job(s) reused", replay.batch_id, reused)
            earlier = await self.get_row(replay.batch_id, owned_by=None)
            return BatchCreated(earlier, 0, reused, 0, 0, 0, replayed=True)
        except IntegrityError as exc:
            if "idempotency" not in str(exc.orig).lower():
                raise
            raise IdempotencyConflict(
                "another request used one of this batch's idempotency keys at the same time; "
                "nothing was created: send the batch again"
            ) from None
        inserted = time.perf_counter()
        enqueued = await self.enqueue_ids(_split_ids(ids)) if enqueue and ids else 0
        logger.info(
            "batch %s: %d job(s) created in %.2f s (%d from the cache, %d waiting for an "
            "identical job), %d reused, %d queued in %.2f s",
            batch.id,
            created,
            inserted - started,
            cached,
            following,
            reused,
            enqueued,
            time.perf_counter() - inserted,
        )
        return BatchCreated(
            batch=batch,
            created=created,
            reused=reused,
            cached=cached,
            following=following,
            enqueued=enqueued,
        )

    def _rows(
        self,
        spec: ItemSpec,
        index: int,
        models: list[str] | None,
        shared: dict[str, Any],
        now: datetime,
    ) -> Iterator[dict[str, Any]]:
        max_attempts = spec.max_attempts or self.settings.max_attempts
        deadline_at = None if spec.deadline_s is None else now + timedelta(seconds=spec.deadline_s)
        prompt = spec.kind == JobKind.PROMPT
        # A prompt's `cache` choice is kept with its input, as JobService.submit does, so
        # that an idempotency key sent again with another choice is a conflict.
        job_input = (
            spec.input if spec.cache is None or not prompt else spec.input | {"cache": spec.cache}
        )
        input_json = orjson.dumps(job_input).decode()
        for model in models or [spec.model or self.settings.default_model]:
            key = spec.idempotency_key
            if key is not None and models:
                key = f"{key}:{model}"
            yield shared | {
                "request_hash": prompt_hash(model, spec.input) if prompt else None,
                "id": clock.new_id(),
                "kind": spec.kind,
                "model": model,
                "input_json": input_json,
                "max_attempts": max_attempts,
                "attempt_budget": max_attempts,
                "deadline_s": spec.deadline_s,
                "deadline_at": deadline_at,
                "idempotency_key": key,
                "batch_index": index,
                "custom_id": spec.custom_id,
            }

    async def enqueue_ids(self, job_ids: Iterable[str]) -> int:
        """Queue jobs through Redis pipelines; 0 (and a warning) when Redis is down."""
        try:
            return await enqueue_many(self.service.queue, job_ids)
        except ServiceUnavailable as exc:
            logger.warning("batch jobs saved but not all queued: %s", exc.message)
            return 0

    async def enqueue_batch(self, batch_id: str) -> int:
        """Queue every queued job of a batch (one created with enqueue=False)."""
        return await self.enqueue_ids(
            [job_id async for job_id in self.job_ids(batch_id, statuses=(JobStatus.QUEUED,))]
        )

    # -- reading ---------------------------------------------------------------------------

    async def get_row(self, batch_id: str, *, owned_by: str | None) -> Batch:
        """The batch row; NotFound if it does not exist or (with owned_by) is not theirs."""
        query = owned_batches(owned_by).where(Batch.id == batch_id)
        async with self.sessionmaker() as session:
            batch = (await session.execute(query)).scalar_one_or_none()
        if batch is None:
            raise NotFound(f"no batch with id {batch_id}")
        return batch

    async def get(self, batch_id: str, *, owned_by: str | None) -> BatchOut:
        """The batch with its counts, progress and usage."""
        (out,) = await self.describe([await self.get_row(batch_id, owned_by=owned_by)])
        return out

    async def list_batches(
        self, *, limit: int, before_id: str | None, owned_by: str | None
    ) -> list[BatchOut]:
        """Newest first; pass the last id seen as `before_id` for the next page."""
        query = owned_batches(owned_by).order_by(Batch.id.desc()).limit(limit)
        if before_id is not None:
            query = query.where(Batch.id < before_id)
        async with self.sessionmaker() as session:
            rows = list((await session.execute(query)).scalars())
        return await self.describe(rows)

    async def describe(self, batches: list[Batch]) -> list[BatchOut]:
        """The batches with their aggregates: one GROUP BY over their jobs.

        A native batch whose jobs have all finished is marked completed (or cancelled, if it
        was being cancelled) here, the first time anyone looks.
        """
        if not batches:
            return []
        ids = [b.id for b in batches]
        used = func.coalesce(Job.prompt_tokens, 0) + func.coalesce(Job.completion_tokens, 0)
        reused = Job.cached_from.is_not(None) & (Job.status == JobStatus.SUCCEEDED)
        query = (
            select(
                Job.batch_id,
                Job.status,
                func.count(),
                func.coalesce(func.sum(Job.prompt_tokens), 0),
                func.coalesce(func.sum(Job.completion_tokens), 0),
                func.coalesce(func.sum(case((reused, 1), else_=0)), 0),
                func.coalesce(func.sum(case((reused, used), else_=0)), 0),
                func.max(Job.finished_at),
            )
            .where(Job.batch_id.in_(ids))
            .group_by(Job.batch_id, Job.status)
        )
        counts: dict[str, dict[str, int]] = {i: {} for i in ids}
        tokens: dict[str, list[int]] = {i: [0, 0, 0, 0] for i in ids}
        ended: dict[str, datetime | None] = dict.fromkeys(ids)
        async with self.sessionmaker() as session:
            for batch_id, status, n, *sums, last_end in await session.execute(query):
                key = str(batch_id)
                counts[key][status] = n
                for i, value in enumerate(sums):
                    tokens[key][i] += int(value or 0)
                if last_end is not None:
                    ended[key] = max(filter(None, (ended[key], last_end)))
        out = []
        for batch in batches:
            by_status = BatchCounts(**counts[batch.id])
            if batch.api == "native" and by_status.active == 0:
                await self._settle(batch, ended[batch.id])
            prompt, completion, reused_answers, reused_tokens = tokens[batch.id]
            usage = BatchUsage(
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=prompt + completion,
                reused_answers=reused_answers,
                reused_tokens=reused_tokens,
            )
            out.append(BatchOut.from_row(batch, by_status, usage))
        return out

    async def _settle(self, batch: Batch, ended_at: datetime | None) -> None:
        """Record that a native batch's jobs have all finished, the last at `ended_at`
        (conditionally: once; settle_finished does the same for batches nobody reads)."""
        if batch.status == BatchStatus.CANCELLING:
            new, column = BatchStatus.CANCELLED, "cancelled_at"
        elif batch.status == BatchStatus.IN_PROGRESS:
            new, column = BatchStatus.COMPLETED, "completed_at"
        else:
            return
        now = clock.now()
        values: dict[str, Any] = {"status": new, "updated_at": now}
        if column == "completed_at":
            values[column] = ended_at or now
        elif batch.cancelled_at is None:
            values[column] = now
        async with self.sessionmaker() as session, session.begin():
            await session.execute(
                update(Batch)
                .where(Batch.id == batch.id, Batch.status == batch.status)
                .values(**values)
            )
        batch.status = new
        batch.updated_at = now
        for key, value in values.items():
            setattr(batch, key, value)

    async def reopen(self, batch_id: str) -> None:
        """Mark a finished native batch in progress again (some of its jobs were re-queued)."""
        async with self.sessionmaker() as session, session.begin():
            await session.execute(
                update(Batch)
                .where(
                    Batch.id == batch_id,
                    Batch.api == "native",
                    Batch.status.in_((BatchStatus.COMPLETED, BatchStatus.CANCELLED)),
                )
                .values(
                    status=BatchStatus.IN_PROGRESS,
                    completed_at=None,
                    cancelled_at=None,
                    updated_at=clock.now(),
                )
            )

    async def job_ids(
        self, batch_id: str, *, statuses: Iterable[str] | None = None
    ) -> AsyncIterator[str]:
        """The ids of the batch's jobs (optionally only in `statuses`), in submission order."""
        after: tuple[int, str] | None = None
        while True:
            query = (
                select(Job.batch_index, Job.id)
                .where(Job.batch_id == batch_id)
                .order_by(Job.batch_index, Job.id)
                .limit(RESULTS_PAGE * 2)
            )
            if statuses is not None:
                query = query.where(Job.status.in_(list(statuses)))
            if after is not None:
                query = query.where(tuple_(Job.batch_index, Job.id) > after)
            async with self.sessionmaker() as session:
                rows = list(await session.execute(query))
            for row in rows:
                yield row.id
            if len(rows) < RESULTS_PAGE * 2:
                return
            after = (rows[-1].batch_index, rows[-1].id)

    async def results(self, batch_id: str) -> AsyncIterator[dict[str, Any]]:
        """Every job of the batch in submission order, as a flat result record.

        Keyset-paginated by (batch_index, id), RESULTS_PAGE rows per query.
        """
        after: tuple[int, str] | None = None
        while True:
            query = _results_query(batch_id).limit(RESULTS_PAGE)
            if after is not None:
                query = query.where(tuple_(Job.batch_index, Job.id) > after)
            async with self.sessionmaker() as session:
                rows = list(await session.execute(query))
            for row in rows:
                yield result_record(row)
            if len(rows) < RESULTS_PAGE:
                return
            after = (rows[-1].batch_index, rows[-1].id)

    async def compare(
        self, batch: Batch, *, after_index: int | None, limit: int
    ) -> tuple[list[CompareRow], int | None]:
        """A page of items with each model's answer; and the cursor of the next page."""
        pick = (
            select(Job.batch_index)
            .where(Job.batch_id == batch.id)
            .group_by(Job.batch_index)
            .order_by(Job.batch_index)
            .limit(limit + 1)
        )
        if after_index is not None:
            pick = pick.where(Job.batch_index > after_index)
        async with self.sessionmaker() as session:
            indexes = list((await session.execute(pick)).scalars())
            page, more = indexes[:limit], len(indexes) > limit
            if not page:
                return [], None
            query = (
                _results_query(batch.id, with_input=True)
                .where(Job.batch_index >= page[0], Job.batch_index <= page[-1])
                .limit(None)
            )
            rows = list(await session.execute(query))
        by_index: dict[int, CompareRow] = {}
        for row in rows:
            entry = by_index.get(row.batch_index)
            if entry is None:
                entry = by_index[row.batch_index] = CompareRow(
                    index=row.batch_index,
                    custom_id=row.custom_id,
                    prompt=prompt_preview(row.input),
                    answers={},
                )
            entry.answers[row.model] = ModelAnswer(
                job_id=row.id,
                status=row.status,
                result=row.result,
                error=row.error,
                latency_ms=row.latency_ms,
                prompt_tokens=row.prompt_tokens,
                completion_tokens=row.completion_tokens,
            )
        return [by_index[i] for i in page if i in by_index], page[-1] if more else None

    async def compare_page(
        self, batch: Batch, *, after_index: int | None, limit: int
    ) -> ComparePage:
        """A page of the comparison, with the summary of the whole batch per model."""
        rows, next_cursor = await self.compare(batch, after_index=after_index, limit=limit)
        summary = await self.model_summary(batch.id)
        models = batch.models or sorted(summary)
        return ComparePage(
            batch_id=batch.id,
            models=models,
            rows=rows,
            summary=[summary.get(m) or ModelSummary.empty(m) for m in models],
            next_cursor=next_cursor,
        )

    async def model_summary(self, batch_id: str) -> dict[str, ModelSummary]:
        """Per model, over the whole batch: answers succeeded and failed, the mean latency of
        the attempts that answered, and tokens (one aggregate query)."""
        succeeded = Job.status == JobStatus.SUCCEEDED
        query = (
            select(
                Job.model,
                func.count().filter(succeeded),
                func.count().filter(Job.status == JobStatus.FAILED),
                func.avg(case((and_(succeeded, JobAttempt.latency_ms > 0), JobAttempt.latency_ms))),
                func.coalesce(func.sum(Job.prompt_tokens), 0),
                func.coalesce(func.sum(Job.completion_tokens), 0),
            )
            .outerjoin(
                JobAttempt, and_(JobAttempt.job_id == Job.id, JobAttempt.number == Job.attempts)
            )
            .where(Job.batch_id == batch_id)
            .group_by(Job.model)
        )
        async with self.sessionmaker() as session:
            found = await session.execute(query)
        return {
            model: ModelSummary(
                model=model,
                succeeded=ok,
                failed=failed,
                mean_latency_ms=None if latency is None else round(float(latency), 1),
                prompt_tokens=int(prompt_tokens),
                completion_tokens=int(completion_tokens),
            )
            for model, ok, failed, latency, prompt_tokens, completion_tokens in found
        }


def _results_query(batch_id: str, *, with_input: bool = False) -> Any:
    """Jobs of a batch in submission order, with the latency of their last attempt."""
    columns: list[Any] = [
        Job.batch_index,
        Job.id,
        Job.custom_id,
        Job.model,
        Job.status,
        Job.result,
        Job.error,
        Job.error_code,
        Job.finish_reason,
        Job.attempts,
        Job.prompt_tokens,
        Job.completion_tokens,
        Job.created_at,
        Job.finished_at,
        JobAttempt.latency_ms,
    ]
    if with_input:
        columns.append(Job.input)
    return (
        select(*columns)
        .outerjoin(JobAttempt, and_(JobAttempt.job_id == Job.id, JobAttempt.number == Job.attempts))
        .where(Job.batch_id == batch_id)
        .order_by(Job.batch_index, Job.id)
    )


#: The fields of a result record, in CSV column order.
RESULT_FIELDS = (
    "index",
    "custom_id",
    "job_id",
    "model",
    "status",
    "result",
    "error",
    "error_code",
    "finish_reason",
    "attempts",
    "latency_ms",
    "prompt_tokens",
    "completion_tokens",
    "created_at",
    "finished_at",
)


def result_record(row: Row[Any]) -> dict[str, Any]:
    """One job of a batch as a results line."""
    return {
        "index": row.batch_index,
        "custom_id": row.custom_id,
        "job_id": row.id,
        "model": row.model,
        "status": row.status,
        "result": row.result,
        "error": row.error,
        "error_code": row.error_code,
        "finish_reason": row.finish_reason,
        "attempts": row.attempts,
        "latency_ms": row.latency_ms,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "created_at": row.created_at,
        "finished_at": row.finished_at,
    }


def prompt_preview(job_input: dict[str, Any]) -> str:
    """A short text naming what an item asked: its last user message, or its document."""
    messages = job_input.get("messages")
    text = ""
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):
                    content = " ".join(
                        str(p.get("text", "")) for p in content if isinstance(p, dict)
                    )
                text = str(content or "")
                break
    else:
        text = str(job_input.get("filename") or job_input.get("document") or "")
    text = " ".join(text.split())
    if len(text) > PROMPT_PREVIEW_CHARS:
        return text[: PROMPT_PREVIEW_CHARS - 1] + "…"
    return text


async def _chunks(
    items: Iterable[ItemSpec] | AsyncIterable[ItemSpec], size: int
) -> AsyncIterator[list[ItemSpec]]:
    chunk: list[ItemSpec] = []
    if isinstance(items, AsyncIterable):
        async for item in items:
            chunk.append(item)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    else:
        for item in items:
            chunk.append(item)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


async def settle_finished(sessionmaker: async_sessionmaker[AsyncSession]) -> int:
    """Mark the native batches whose jobs have all ended: `completed` (at their last job's
    end) or, if being cancelled, `cancelled`; how many.

    Reading a batch through promptq does this too (`BatchService.describe`); the reconciler
    calls this every pass, so that the `batches` table is right for readers of plain SQL. An
    open batch is found to be still running by its last active job in submission order (the
    index on batch_id, batch_index, read backwards: the unfinished jobs are mostly at the end).
    """
    now = clock.now()
    last_active = (
        select(Job.id)
        .where(Job.batch_id == Batch.id, Job.status.in_(IN_FLIGHT))
        .order_by(Job.batch_index.desc())
        .limit(1)
        .scalar_subquery()
    )
    last_end = select(func.max(Job.finished_at)).where(Job.batch_id == Batch.id).scalar_subquery()
    now_value = literal(now, UTCDateTime())
    finished = (Batch.api == "native") & last_active.is_(None)
    open_statuses = (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)
    async with sessionmaker() as session:  # a read first: most passes find none, and write nothing
        found = list(
            await session.scalars(select(Batch.id).where(Batch.status.in_(open_statuses), finished))
        )
    if not found:
        return 0
    chosen = Batch.id.in_(found) & finished
    async with sessionmaker() as session, session.begin():
        completed = await session.execute(
            update(Batch)
            .where(chosen, Batch.status == BatchStatus.IN_PROGRESS)
            .values(
                status=BatchStatus.COMPLETED,
                completed_at=func.coalesce(last_end, now_value),
                updated_at=now,
            )
        )
        cancelled = await session.execute(
            update(Batch)
            .where(chosen, Batch.status == BatchStatus.CANCELLING)
            .values(
                status=BatchStatus.CANCELLED,
                cancelled_at=func.coalesce(Batch.cancelled_at, now_value),
                updated_at=now,
            )
        )
    settled: int = completed.rowcount + cancelled.rowcount  # type: ignore[attr-defined]
    return settled


async def _drop_reused(
    conn: AsyncConnection,
    rows: list[dict[str, Any]],
    owner_key_id: str | None,
    reused_from: set[str | None],
) -> list[dict[str, Any]]:
    """The rows whose idempotency key is new, adding the batches of the others' jobs to
    `reused_from`; IdempotencyConflict if a key was used for a different request."""
    keyed = {row["idempotency_key"]: row for row in rows if row["idempotency_key"] is not None}
    if not keyed:
        return rows
    owner = Job.owner_key_id.is_(None) if owner_key_id is None else Job.owner_key_id == owner_key_id
    query = select(
        Job.id,
        Job.idempotency_key,
        Job.kind,
        Job.model,
        Job.input,
        Job.max_attempts,
        Job.deadline_s,
        Job.batch_id,
    ).where(owner, Job.idempotency_key.in_(list(keyed)))
    existing = list(await conn.execute(query))
    if not existing:
        return rows
    for job in existing:
        row = keyed[job.idempotency_key]
        mine = (
            row["kind"],
            row["model"],
            orjson.loads(row["input_json"]),
            row["max_attempts"],
            row["deadline_s"],
        )
        if (job.kind, job.model, job.input, job.max_attempts, job.deadline_s) != mine:
            raise IdempotencyConflict(
                f"idempotency_key {job.idempotency_key!r} was already used by job {job.id} for "
                "a different request; nothing was created: use a new key for a new request"
            )
    taken = {job.idempotency_key for job in existing}
    reused_from.update(job.batch_id for job in existing)
    return [row for row in rows if row["idempotency_key"] not in taken]


async def _raise_if_replayed(
    session: AsyncSession, batch: Batch, earlier_id: str | None, reused: int
) -> None:
    """_Replayed if `batch`, whose `reused` items all reused jobs of the batch `earlier_id`,
    is that batch sent again: the same owner, API and models, and as many jobs."""
    earlier = None if earlier_id is None else await session.get(Batch, earlier_id)
    if (
        earlier is not None
        and earlier.job_count == reused
        and (earlier.owner_key_id, earlier.api, earlier.models)
        == (batch.owner_key_id, batch.api, batch.models)
    ):
        raise _Replayed(earlier.id)


async def _answer_from_cache(
    conn: AsyncConnection, rows: list[dict[str, Any]], owner_key_id: str | None, now: datetime
) -> int:
    """Turn the rows with a stored answer into cache hits (in place); how many there were."""
    answers = await find_many(conn, {row["request_hash"] for row in rows}, owner_key_id)
    hits = 0
    for row in rows:
        source = answers.get(row["request_hash"])
        if source is not None:
            row.update(hit_values(source, now))
            hits += 1
    return hits


#: The columns of a cache hit's answer (promptq.cache.hit_values), NULL in other rows.
_ANSWER_KEYS = (
    "cached_from", "result", "finish_reason", "prompt_tokens", "completion_tokens",
    "started_at", "finished_at",
)  # fmt: skip
#: The columns a batch's INSERT writes, in the order of the PostgreSQL statement's parameters.
_ROW_KEYS = (
    "id", "kind", "status", "model", "input_json", "attempts", "interruptions", "max_attempts",
    "attempt_budget", "deadline_s", "deadline_at", "idempotency_key", "owner_key_id",
    "batch_id", "batch_index", "custom_id", "priority", "created_at", "updated_at",
    "request_hash", *_ANSWER_KEYS,
)  # fmt: skip
_ROW_VALUES = itemgetter(*_ROW_KEYS)
_PG_INSERT = (
    f"INSERT INTO jobs ({', '.join(k.removesuffix('_json') for k in _ROW_KEYS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(_ROW_KEYS) + 1))})"
)


async def _insert(conn: AsyncConnection, statement: Any, rows: list[dict[str, Any]]) -> None:
    """One executemany of `rows`.

    On PostgreSQL the rows go to asyncpg's executemany as plain tuples, through
    `exec_driver_sql` (the same connection and transaction): SQLAlchemy's per-row parameter
    processing was most of the ingest time of a 100k batch (see bench/ingest.py), and every
    value here is already what asyncpg takes (aware datetimes, JSON text for JSONB). SQLite
    goes through the compiled Core statement, whose types store datetimes its own way.
    """
    if conn.dialect.name == "postgresql":
        await conn.exec_driver_sql(_PG_INSERT, [_ROW_VALUES(row) for row in rows])
    else:
        await conn.execute(statement, rows)


def _insert_jobs(dialect: str) -> Any:
    """INSERT INTO jobs for executemany, with `input` bound as JSON text already serialized
    (by orjson, once per item, instead of by the column type's json.dumps)."""
    input_json = bindparam("input_json", type_=Text)
    value = cast(input_json, JSONB) if dialect == "postgresql" else input_json
    return insert(_JOBS).values(input=value)


def _split_ids(blob: bytearray) -> Iterator[str]:
    view = memoryview(blob)
    for start in range(0, len(blob), _ID_CHARS):
        yield bytes(view[start : start + _ID_CHARS]).decode()
