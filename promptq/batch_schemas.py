"""What the batch routes, the CLI and the Python client show of a batch."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from promptq.models import Batch


class BatchCounts(BaseModel):
    """Jobs of the batch per status."""

    queued: int = 0
    running: int = 0
    retrying: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def active(self) -> int:
        """Jobs that have not finished."""
        return self.queued + self.running + self.retrying

    @property
    def done(self) -> int:
        """Jobs that have finished, however they ended."""
        return self.succeeded + self.failed + self.cancelled


class BatchProgress(BaseModel):
    """Finished jobs out of all the batch's jobs."""

    done: int
    total: int
    fraction: float


class BatchUsage(BaseModel):
    """Tokens the batch's jobs used so far (succeeded jobs report usage)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    #: Succeeded jobs that reused the answer of an identical request (a stored one, or one in
    #: flight: see `cached_from`) instead of calling the model.
    reused_answers: int = 0
    #: The part of total_tokens that came with reused answers: no model processed them for
    #: this batch.
    reused_tokens: int = 0


class BatchOut(BaseModel):
    """A batch with its live counts, progress and token usage."""

    id: str
    api: str
    name: str | None
    status: str
    #: The models of a comparison batch (each item runs on each); None otherwise.
    models: list[str] | None
    metadata: dict[str, Any] | None
    #: Jobs in the batch (items x models for a comparison batch).
    total: int
    counts: BatchCounts
    progress: BatchProgress
    usage: BatchUsage
    created_at: datetime
    updated_at: datetime
    completed_at: datetime | None
    cancelled_at: datetime | None
    expires_at: datetime | None

    @classmethod
    def from_row(cls, batch: Batch, counts: BatchCounts, usage: BatchUsage) -> BatchOut:
        """Build from a `batches` row and its jobs' aggregates."""
        total = batch.job_count
        done = counts.done
        return cls(
            id=batch.id,
            api=batch.api,
            name=batch.name,
            status=batch.status,
            models=batch.models,
            metadata=batch.metadata_,
            total=total,
            counts=counts,
            progress=BatchProgress(
                done=done, total=total, fraction=round(done / total, 4) if total else 1.0
            ),
            usage=usage,
            created_at=batch.created_at,
            updated_at=batch.updated_at,
            completed_at=batch.completed_at,
            cancelled_at=batch.cancelled_at,
            expires_at=batch.expires_at,
        )


class BatchCreatedOut(BatchOut):
    """The answer to `POST /api/batches`."""

    #: Jobs created by this request.
    created: int
    #: Items whose idempotency_key matched an existing job, which was kept instead.
    reused: int
    #: Jobs of `created` answered from the result cache (already succeeded, never queued).
    cached: int = 0
    #: Jobs of `created` that wait for the answer of an identical job in flight, or of an
    #: identical item before them, instead of calling the model themselves.
    following: int = 0


class BatchPage(BaseModel):
    """One page of a batch listing, newest first; pass `next_cursor` back for the next."""

    batches: list[BatchOut]
    next_cursor: str | None


class ModelAnswer(BaseModel):
    """One model's answer to one item of a comparison batch."""

    job_id: str
    status: str
    result: str | None
    error: str | None
    #: Latency of the attempt that answered (the last one).
    latency_ms: int | None
    prompt_tokens: int | None
    completion_tokens: int | None


class CompareRow(BaseModel):
    """One item of a batch, with every model's answer side by side."""

    index: int
    custom_id: str | None
    #: The item's prompt (its last user message, or the document's name), shortened.
    prompt: str
    answers: dict[str, ModelAnswer]


class ModelSummary(BaseModel):
    """How one model did over the whole comparison batch (not only the page)."""

    model: str
    succeeded: int
    failed: int
    mean_latency_ms: float | None
    prompt_tokens: int
    completion_tokens: int

    @classmethod
    def empty(cls, model: str) -> ModelSummary:
        """A model with no jobs in the batch."""
        return cls(
            model=model,
            succeeded=0,
            failed=0,
            mean_latency_ms=None,
            prompt_tokens=0,
            completion_tokens=0,
        )


class ComparePage(BaseModel):
    """A page of a comparison; pass `next_cursor` back for the next."""

    batch_id: str
    models: list[str]
    rows: list[CompareRow]
    summary: list[ModelSummary]
    next_cursor: int | None
