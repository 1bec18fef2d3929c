"""Submitting jobs: validate, write the row, then enqueue. Shared by the API and the CLI."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from promptq.checkpoints import ChunkStore
from promptq.documents import check_size
from promptq.errors import InvalidRequest, ServiceUnavailable
from promptq.models import Job, JobKind, JobStatus
from promptq.queue import QueueClient
from promptq.schemas import JobOut, PromptJobCreate, SummarizeJobCreate, job_create_adapter
from promptq.settings import Settings
from promptq.store import JobStore

logger = logging.getLogger(__name__)


def parse_job_request(payload: Any) -> PromptJobCreate | SummarizeJobCreate:
    """Validate a job request body, turning pydantic's errors into one InvalidRequest."""
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


class JobService:
    """The producer side: the only way jobs get into the store and the queue."""

    def __init__(self, settings: Settings, store: JobStore, queue: QueueClient) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.checkpoints = ChunkStore(store.sessionmaker)

    def check(self, request: PromptJobCreate | SummarizeJobCreate) -> None:
        """Refuse what the schema cannot judge alone: a document over the size limit (413)."""
        if isinstance(request, SummarizeJobCreate):
            size_bytes = len(request.document.encode("utf-8", errors="surrogatepass"))
            check_size(request.filename or "document", size_bytes, self.settings.max_document_bytes)

    async def submit(self, request: PromptJobCreate | SummarizeJobCreate) -> tuple[Job, bool]:
        """Write the job row first, then enqueue it. Returns (job, created).

        A job that is saved but cannot be queued (Redis down) stays `queued` in SQL, and the
        workers' reconciler enqueues it once Redis is back: nothing accepted is lost.
        """
        self.check(request)
        job, created = await self.store.create_job(
            kind=request.kind,
            model=request.model or self.settings.default_model,
            input=request.job_input(),
            max_attempts=request.max_attempts or self.settings.max_attempts,
            idempotency_key=request.idempotency_key,
        )
        if created or job.status == JobStatus.QUEUED:
            try:
                await self.queue.enqueue(job.id)
            except ServiceUnavailable:
                logger.warning(
                    "job %s saved but not queued (Redis down); the reconciler will", job.id
                )
        return job, created

    async def submit_all(
        self, requests: list[PromptJobCreate | SummarizeJobCreate]
    ) -> list[tuple[Job, bool]]:
        """Check every request first, so a bad one creates nothing; then submit each in order."""
        for request in requests:
            self.check(request)
        return [await self.submit(request) for request in requests]

    async def describe(self, jobs: list[Job]) -> list[JobOut]:
        """The jobs as the API shows them, summarize jobs with their progress."""
        summarize_ids = [job.id for job in jobs if job.kind == JobKind.SUMMARIZE]
        progress = await self.checkpoints.progress(summarize_ids)
        return [JobOut.from_row(job, progress.get(job.id)) for job in jobs]
