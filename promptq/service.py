"""Submitting jobs: validate, write the row, then enqueue. Shared by the API and the CLI."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any

from pydantic import ValidationError

from promptq.cache import ResultCache, prompt_hash
from promptq.checkpoints import ChunkStore
from promptq.documents import check_size
from promptq.errors import InvalidRequest, ServiceUnavailable
from promptq.input_limits import check_messages
from promptq.models import Job, JobKind, JobStatus, Priority
from promptq.queue import QueueClient
from promptq.schemas import JobOut, PromptJobCreate, SummarizeJobCreate, job_create_adapter
from promptq.settings import Settings
from promptq.store import JobStore

logger = logging.getLogger(__name__)


#: Deepest JSON nesting accepted in a request (orjson can't write beyond 254 levels).
MAX_JSON_DEPTH = 64
#: Identical requests of one key take turns to look for an answer or a leader and to write
#: their job (a turn is a few ms); a turn is given up after SINGLE_FLIGHT_HOLD_S if its holder
#: died, and a request waits at most SINGLE_FLIGHT_WAIT_S for its turn, then goes on without.
SINGLE_FLIGHT_HOLD_S = 5.0
SINGLE_FLIGHT_WAIT_S = 2.0


def parse_job_request(payload: Any) -> PromptJobCreate | SummarizeJobCreate:
    """Validate a job request body, turning pydantic's errors into one InvalidRequest."""
    check_storable(payload)
    try:
        return job_create_adapter.validate_python(payload)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """A short, readable summary of what is wrong with a request."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:10]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def check_storable(value: Any) -> None:
    """Refuse what would be accepted but then break: NUL characters and very deep nesting.

    PostgreSQL cannot store U+0000 in text or JSONB, and a body nested deeper than orjson can
    write would be saved but never readable.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise InvalidRequest("strings may not contain NUL (\\u0000) characters")
            continue
        if not isinstance(item, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(f"the request nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((key, depth) for key in item)
            stack.extend((child, depth + 1) for child in item.values())
        else:
            stack.extend((child, depth + 1) for child in item)


class JobService:
    """The producer side: the only way jobs get into the store and the queue."""

    def __init__(self, settings: Settings, store: JobStore, queue: QueueClient) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.checkpoints = ChunkStore(store.sessionmaker)
        self.cache = ResultCache(store.sessionmaker, enabled=settings.cache_enabled)

    def check(self, request: PromptJobCreate | SummarizeJobCreate) -> None:
        """Refuse what the schema cannot judge alone: input over the settings' limits (413)."""
        if isinstance(request, PromptJobCreate):
            check_messages([m.model_dump() for m in request.messages], self.settings)
        if isinstance(request, SummarizeJobCreate):
            size_bytes = len(request.document.encode("utf-8", errors="surrogatepass"))
            check_size(request.filename or "document", size_bytes, self.settings.max_document_bytes)

    async def submit(
        self,
        request: PromptJobCreate | SummarizeJobCreate,
        *,
        owner_key_id: str | None = None,
    ) -> tuple[Job, bool]:
        """Write the job row first, then enqueue it. Returns (job, created).

        `owner_key_id` is the API key the job belongs to (None: the local operator's).

        A job that is saved but cannot be queued (Redis down) stays `queued` in SQL, and the
        workers' reconciler enqueues it once Redis is back: nothing accepted is lost.
        """
        self.check(request)
        model = request.model or self.settings.default_model
        job_input = request.job_input()
        digest = answer = leader_id = None
        one_at_a_time: AbstractAsyncContextManager[object] = nullcontext()
        if isinstance(request, PromptJobCreate):
            if request.cache is not None:
                # Kept with the request, so that an idempotency key sent again with another
                # `cache` choice is a conflict (JobStore._check_same); the hash leaves it out.
                job_input["cache"] = request.cache
            digest = prompt_hash(model, job_input)
            if self.cache.wants(job_input["params"], request.cache):
                # Identical requests sent at the same moment would each find no leader yet
                # and each call the model: they look and write one at a time instead.
                one_at_a_time = self.queue.exclusive(
                    f"single-flight:{owner_key_id or '-'}:{digest}",
                    hold_s=SINGLE_FLIGHT_HOLD_S,
                    wait_s=SINGLE_FLIGHT_WAIT_S,
                )
        async with one_at_a_time:
            if isinstance(request, PromptJobCreate):
                digest, answer, leader_id = await self.cache.lookup(
                    model, job_input, request.cache, owner_key_id, follow_at=Priority.BULK
                )
            job, created = await self.store.create_job(
                kind=request.kind,
                model=model,
                input=job_input,
                max_attempts=request.max_attempts or self.settings.max_attempts,
                idempotency_key=request.idempotency_key,
                owner_key_id=owner_key_id,
                deadline_s=request.deadline_s,
                request_hash=digest,
                answer_from=answer,
                leader_id=leader_id,
            )
        if job.status == JobStatus.QUEUED:
            await self._enqueue(job.id)
        return job, created

    async def submit_all(
        self,
        requests: list[PromptJobCreate | SummarizeJobCreate],
        *,
        owner_key_id: str | None = None,
    ) -> list[tuple[Job, bool]]:
        """Check every request first, so a bad one creates nothing; then submit each in order."""
        for request in requests:
            self.check(request)
        return [await self.submit(r, owner_key_id=owner_key_id) for r in requests]

    async def describe(self, jobs: list[Job], *, with_input: bool = True) -> list[JobOut]:
        """The jobs as the API shows them, summarize jobs with their progress (and each
        job's input only `with_input`)."""
        summarize_ids = [job.id for job in jobs if job.kind == JobKind.SUMMARIZE]
        progress = await self.checkpoints.progress(summarize_ids)
        return [JobOut.from_row(job, progress.get(job.id), with_input=with_input) for job in jobs]

    async def retry(self, job_ids: Sequence[str]) -> list[str]:
        """Re-queue failed or cancelled jobs with a fresh attempt budget; the ids re-queued."""
        requeued = await self.store.requeue(job_ids)
        for job_id in requeued:
            await self._enqueue(job_id)
        return requeued

    async def retry_one(self, job_id: str) -> Job:
        """Re-queue one failed or cancelled job; NotFound or JobNotRetryable otherwise."""
        job = await self.store.requeue_one(job_id)
        await self._enqueue(job.id)
        return job

    async def _enqueue(self, job_id: str) -> None:
        try:
            await self.queue.enqueue(job_id)
        except ServiceUnavailable:
            logger.warning("job %s saved but not queued (Redis down); the reconciler will", job_id)
