"""The OpenAI Batch API over promptq batches.

A batch made from an input file is an ordinary promptq batch (`batches.api = "openai"`, one
job per request, made by promptq.batches.BatchService), so it is queryable at /api/batches and
in SQL like any other. Its life:

* `validating`: every line of the input file is checked (promptq.openai_batch_input). A bad
  file makes a `failed` batch whose `errors` list the bad lines, and no job.
* `in_progress`: the jobs run as bulk work (behind interactive requests).
* `finalizing`: every job has ended; the output file (the succeeded requests) and the error
  file (failed, cancelled and expired ones) are written, in input order.
* `completed`; or `cancelling` → `cancelled` when cancelled, here or at the native
  `/api/batches/{id}/cancel` alike (promptq.cancel.Canceller: queued jobs never start, running
  ones are aborted, finished ones keep their results); or
  `expired` when the completion window ran out first (its unfinished jobs are cancelled).

`refresh` moves a batch along. It runs whenever a batch is read and, for all open batches,
from the API's background sweep, so a batch finishes even if nobody looks. Every step is a
conditional UPDATE, so several API processes can sweep at once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import suppress
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import func, select, tuple_, update

from promptq import clock, openai_format
from promptq.batch_items import ItemSpec
from promptq.batches import BatchService, owned_batches
from promptq.cache import answered_model, outcome_status_code
from promptq.cancel import Canceller
from promptq.errors import NotCancellable, NotFound
from promptq.files import OUTPUT_PURPOSE, FileStore, new_file
from promptq.model_catalog import ModelCatalog
from promptq.models import Batch, BatchStatus, Job, JobKind, JobStatus, Priority
from promptq.openai_batch_input import COMPLETION_WINDOWS, ENDPOINTS, BatchRequest, check_input
from promptq.openai_schemas import BadRequest
from promptq.service import JobService

logger = logging.getLogger(__name__)

API = "openai"
#: How long a request may take after the batch is created.
WINDOWS = {"24h": timedelta(hours=24)}
#: Statuses `refresh` may move on.
OPEN = (BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.CANCELLING)
#: A batch left `finalizing` this long (its finalizer died) is finalized again.
FINALIZE_STALE = timedelta(seconds=60)
#: Jobs read per query when writing the output files.
PAGE = 500
#: Batches one sweep looks at.
SWEEP_LIMIT = 200
MAX_METADATA_PAIRS = 16
MAX_METADATA_CHARS = 512


class OpenAIBatches:
    """Create, read, list and cancel OpenAI Batch API batches; move them through their life."""

    def __init__(self, service: JobService, catalog: ModelCatalog | None = None) -> None:
        self.service = service
        self.sessionmaker = service.store.sessionmaker
        self.files = FileStore(self.sessionmaker)
        self.catalog = catalog

    # -- creating --------------------------------------------------------------------------

    async def create(
        self,
        *,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, Any] | None,
        owner_key_id: str | None,
        owned_by: str | None,
    ) -> Batch:
        """Check the input file; make the batch (`failed` with per-line errors if it is bad)."""
        if endpoint not in ENDPOINTS:
            raise BadRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        if completion_window not in COMPLETION_WINDOWS:
            raise BadRequest(f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}")
        _check_metadata(metadata)
        source = await self.files.get(input_file_id, owned_by=owned_by, content=True)
        if source.purpose != "batch":
            raise BadRequest(f"file {input_file_id} was not uploaded with purpose=batch")
        check = check_input(source.content, endpoint, None, settings=self.service.settings)
        if self.catalog is not None:  # each model against its own endpoint's list
            names = [m for r in check.requests for m in (r.body.model, *r.body.fallback_models)]
            check.reject_models(await self.catalog.unknown(names))
        now = clock.now()
        fields: dict[str, Any] = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
        }
        expires_at = now + WINDOWS[completion_window]
        if check.error_count:
            batch = Batch(
                id=clock.new_id(),
                api=API,
                status=BatchStatus.FAILED,
                job_count=0,
                metadata_=metadata,
                owner_key_id=owner_key_id,
                created_at=now,
                updated_at=now,
                expires_at=expires_at,
                errors=check.errors_object(),
                failed_at=now,
                **fields,
            )
            async with self.sessionmaker() as session, session.begin():
                session.add(batch)
            logger.info(
                "openai batch %s failed validation (%d error(s))", batch.id, check.error_count
            )
            return batch
        created = await BatchService(self.service).create(
            (_item(request) for request in check.requests),
            owner_key_id=owner_key_id,
            api=API,
            metadata=metadata,
            status=BatchStatus.IN_PROGRESS,
            expires_at=expires_at,
            priority=Priority.BULK,
        )
        async with self.sessionmaker() as session, session.begin():
            await session.execute(
                update(Batch)
                .where(Batch.id == created.batch.id)
                .values(**fields, in_progress_at=now)
            )
        return await self._row(created.batch.id, owned_by=None)

    # -- reading ---------------------------------------------------------------------------

    async def retrieve(self, batch_id: str, *, owned_by: str | None) -> dict[str, Any]:
        """The batch object, moved along first if it can be."""
        batch = await self.refresh(await self._row(batch_id, owned_by=owned_by))
        return batch_object(batch, await self.counts(batch.id))

    async def list(
        self, *, after: str | None, limit: int, owned_by: str | None
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of batch objects, newest first, after the `after` id; and whether more."""
        query = (
            owned_batches(owned_by)
            .where(Batch.api == API)
            .order_by(Batch.id.desc())
            .limit(limit + 1)
        )
        if after is not None:
            query = query.where(Batch.id < after)
        async with self.sessionmaker() as session:
            rows = list((await session.execute(query)).scalars())
        page = [await self.refresh(row) for row in rows[:limit]]
        return [batch_object(row, await self.counts(row.id)) for row in page], len(rows) > limit

    async def _row(self, batch_id: str, *, owned_by: str | None) -> Batch:
        query = owned_batches(owned_by).where(Batch.id == batch_id, Batch.api == API)
        async with self.sessionmaker() as session:
            batch = (await session.execute(query)).scalar_one_or_none()
        if batch is None:
            raise NotFound(f"no batch with id {batch_id[:80]!r}")
        return batch

    async def counts(self, batch_id: str) -> dict[str, int]:
        query = (
            select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
        )
        async with self.sessionmaker() as session:
            return {str(status): int(n) for status, n in await session.execute(query)}

    # -- cancelling ------------------------------------------------------------------------

    async def cancel(self, batch_id: str, *, owned_by: str | None) -> dict[str, Any]:
        """Cancel the batch's unfinished requests (finished ones keep their results)."""
        batch = await self.refresh(await self._row(batch_id, owned_by=owned_by))
        if batch.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            return batch_object(batch, await self.counts(batch.id))
        if batch.status != BatchStatus.IN_PROGRESS:
            raise NotCancellable(
                f"batch {batch_id} is {batch.status}; only a batch in progress can be cancelled"
            )
        await self._stop(batch, expired=False)
        return await self.retrieve(batch_id, owned_by=None)

    async def _stop(self, batch: Batch, *, expired: bool) -> None:
        """Cancel the unfinished jobs through promptq.cancel, the one place that cancels a
        batch (whichever route asks) and stamps OpenAI's `cancelling_at`; an expired batch
        gets its `expired_at` first, so that it ends `expired` rather than `cancelled`."""
        if expired:
            now = clock.now()
            async with self.sessionmaker() as session, session.begin():
                await session.execute(
                    update(Batch)
                    .where(Batch.id == batch.id, Batch.status == BatchStatus.IN_PROGRESS)
                    .values(expired_at=now, updated_at=now)
                )
        with suppress(NotCancellable):  # it finished meanwhile: refresh settles it
            await Canceller(self.service).cancel_batch(batch.id, owned_by=None)

    # -- moving along ----------------------------------------------------------------------

    async def sweep(self) -> int:
        """Refresh every open OpenAI batch; how many changed status."""
        query = (
            select(Batch)
            .where(Batch.api == API, Batch.status.in_(OPEN))
            .order_by(Batch.id)
            .limit(SWEEP_LIMIT)
        )
        async with self.sessionmaker() as session:
            rows = list((await session.execute(query)).scalars())
        changed = 0
        for row in rows:
            if (await self.refresh(row)).status != row.status:
                changed += 1
        return changed

    async def refresh(self, batch: Batch) -> Batch:
        """Expire or finalize the batch if it is time to; the batch as it is now."""
        if batch.status not in OPEN:
            return batch
        now = clock.now()
        if (
            batch.status == BatchStatus.IN_PROGRESS
            and batch.expires_at is not None
            and now >= batch.expires_at
        ):
            await self._stop(batch, expired=True)
            batch = await self._row(batch.id, owned_by=None)
        counts = await self.counts(batch.id)
        active = sum(
            counts.get(s, 0) for s in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.RETRYING)
        )
        if active == 0:
            await self._finalize(batch)
            batch = await self._row(batch.id, owned_by=None)
        return batch

    async def _finalize(self, batch: Batch) -> None:
        """Write the output and error files, then mark the batch's final status (once)."""
        now = clock.now()
        if batch.status == BatchStatus.FINALIZING:
            started = batch.finalizing_at
            if started is not None and now - started < FINALIZE_STALE:
                return  # another process is at it
        async with self.sessionmaker() as session, session.begin():
            taken = await session.execute(
                update(Batch)
                .where(Batch.id == batch.id, Batch.status == batch.status)
                .values(status=BatchStatus.FINALIZING, finalizing_at=now, updated_at=now)
            )
            if taken.rowcount != 1:  # type: ignore[attr-defined]
                return
        output, errors = bytearray(), bytearray()
        async for line, ok in self._output_lines(batch):
            (output if ok else errors).extend(orjson.dumps(line) + b"\n")
        final, stamp = _final_status(batch)
        end = clock.now()
        values: dict[str, Any] = {"status": final, stamp: end, "updated_at": end}
        async with self.sessionmaker() as session, session.begin():
            for content, kind in ((output, "output"), (errors, "error")):
                if not content:
                    continue
                row = new_file(
                    owner_key_id=batch.owner_key_id,
                    purpose=OUTPUT_PURPOSE,
                    filename=f"batch_{batch.id}_{kind}.jsonl",
                    content=bytes(content),
                )
                session.add(row)
                values[f"{kind}_file_id"] = row.id
            await session.flush()
            done = await session.execute(
                update(Batch)
                .where(Batch.id == batch.id, Batch.status == BatchStatus.FINALIZING)
                .values(**values)
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                await session.rollback()
                return
        logger.info("openai batch %s %s", batch.id, final)

    async def _output_lines(self, batch: Batch) -> AsyncIterator[tuple[dict[str, Any], bool]]:
        """Each request's output line in input order, and whether it goes to the output file."""
        why = "batch_expired" if batch.expired_at is not None else "batch_cancelled"
        after: tuple[int, str] | None = None
        while True:
            query = (
                select(Job, outcome_status_code(Job), answered_model(Job))
                .where(Job.batch_id == batch.id)
                .order_by(Job.batch_index, Job.id)
                .limit(PAGE)
            )
            if after is not None:
                query = query.where(tuple_(Job.batch_index, Job.id) > after)
            async with self.sessionmaker() as session:
                rows = list(await session.execute(query))
            for job, status_code, model in rows:
                yield output_line(job, status_code, model or job.model, why)
            if len(rows) < PAGE:
                return
            last = rows[-1][0]
            after = (last.batch_index or 0, last.id)


def _item(request: BatchRequest) -> ItemSpec:
    body = request.body
    return ItemSpec(
        kind=JobKind.PROMPT,
        model=body.model,
        input=body.job_input(),
        max_attempts=body.max_attempts,
        deadline_s=body.deadline_s,
        idempotency_key=None,
        custom_id=request.custom_id,
        cache=body.cache,
    )


def _final_status(batch: Batch) -> tuple[BatchStatus, str]:
    if batch.expired_at is not None:
        return BatchStatus.EXPIRED, "expired_at"
    if batch.cancelling_at is not None:
        return BatchStatus.CANCELLED, "cancelled_at"
    return BatchStatus.COMPLETED, "completed_at"


def output_line(
    job: Job, status_code: int | None, model: str, why: str
) -> tuple[dict[str, Any], bool]:
    """A request's line: `{"id", "custom_id", "response", "error"}`; True for the output file.
    `model` made the answer (a fallback model, or the job's)."""
    line: dict[str, Any] = {"id": f"batch_req_{job.id}", "custom_id": job.custom_id}
    if job.status == JobStatus.SUCCEEDED:
        body = openai_format.chat_completion(job, model)
        line |= {"response": {"status_code": 200, "request_id": job.id, "body": body}}
        return line | {"error": None}, True
    if job.status == JobStatus.FAILED:
        code = status_code if status_code is not None and status_code >= 400 else 500
        error = {
            "message": job.error,
            "type": "server_error" if code >= 500 else "invalid_request_error",
            "param": None,
            "code": job.error_code,
        }
        line |= {"response": {"status_code": code, "request_id": job.id, "body": {"error": error}}}
        return line | {"error": None}, False
    message = (
        "the batch expired before this request ran"
        if why == "batch_expired"
        else ("the batch was cancelled before this request finished")
    )
    return line | {"response": None, "error": {"code": why, "message": message}}, False


def batch_object(batch: Batch, counts: dict[str, int]) -> dict[str, Any]:
    """The OpenAI `batch` object."""
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": batch.errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": _shown_status(batch),
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": _ts(batch.created_at),
        "in_progress_at": _ts(batch.in_progress_at),
        "expires_at": _ts(batch.expires_at),
        "finalizing_at": _ts(batch.finalizing_at),
        "completed_at": _ts(batch.completed_at),
        "failed_at": _ts(batch.failed_at),
        "expired_at": _ts(batch.expired_at),
        "cancelling_at": _ts(batch.cancelling_at),
        "cancelled_at": _ts(batch.cancelled_at),
        "request_counts": {
            "total": batch.job_count,
            "completed": counts.get(JobStatus.SUCCEEDED, 0),
            "failed": counts.get(JobStatus.FAILED, 0),
        },
        "metadata": batch.metadata_,
    }


def _shown_status(batch: Batch) -> str:
    """The batch's status as OpenAI's lifecycle names it: a cancelled (or expiring) batch
    whose files are being written is still `cancelling` (or `in_progress`), never
    `finalizing`, which OpenAI's batches only pass through on their way to `completed`."""
    if batch.status == BatchStatus.FINALIZING:
        final, _ = _final_status(batch)
        if final == BatchStatus.CANCELLED:
            return BatchStatus.CANCELLING.value
        if final == BatchStatus.EXPIRED:
            return BatchStatus.IN_PROGRESS.value
    return str(batch.status)


def _ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def _check_metadata(metadata: dict[str, Any] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise BadRequest(f"metadata may hold at most {MAX_METADATA_PAIRS} pairs")
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > 64 or len(value) > MAX_METADATA_CHARS:
            raise BadRequest(
                "metadata values must be strings (keys up to 64 characters, values up to "
                f"{MAX_METADATA_CHARS})"
            )
