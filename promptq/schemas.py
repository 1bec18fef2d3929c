"""Pydantic models for what crosses an edge: HTTP bodies and job payloads."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from promptq.documents import has_text
from promptq.models import Job, JobAttempt

MAX_ATTEMPTS_LIMIT = 100
#: Largest accepted `max_tokens`: more than any model writes in one answer.
MAX_TOKENS_LIMIT = 1_000_000
#: Longest accepted deadline_s: a week, as long as a job stays in Redis.
MAX_DEADLINE_S = 7 * 24 * 3600.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(BaseModel):
    """One OpenAI chat message. Extra OpenAI fields (name, tool_calls, ...) pass through."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None


class ChatParams(_Strict):
    """Optional sampling parameters forwarded to the model."""

    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    #: A 64-bit integer, as OpenAI-compatible servers take it.
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value


class _JobCreateBase(_Strict):
    model: str | None = Field(default=None, min_length=1, max_length=255)
    params: ChatParams = Field(default_factory=ChatParams)
    max_attempts: int | None = Field(default=None, ge=1, le=MAX_ATTEMPTS_LIMIT)
    #: Overall wall-clock budget in seconds from creation; past it the job fails, not retries.
    deadline_s: float | None = Field(default=None, gt=0, le=MAX_DEADLINE_S)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)


class PromptJobCreate(_JobCreateBase):
    """A chat completion to run."""

    kind: Literal["prompt"]
    messages: list[ChatMessage] = Field(min_length=1)
    #: Reuse a stored identical answer (true), never (false), or when deterministic (unset:
    #: temperature 0 or a seed). See promptq.cache.
    cache: bool | None = None

    def job_input(self) -> dict[str, Any]:
        """The `jobs.input` JSON for this request."""
        return {
            "messages": [m.model_dump(exclude_none=False) for m in self.messages],
            "params": self.params.model_dump(exclude_none=True),
        }


class SummarizeJobCreate(_JobCreateBase):
    """A document to summarize, in one call or by map-reduce over chunks when it is long."""

    kind: Literal["summarize"]
    document: str = Field(min_length=1)
    instructions: str | None = Field(default=None, max_length=10_000)
    style: Literal["bullets", "paragraph"] | None = None
    #: Roughly how long the summary should be.
    target_words: int | None = Field(default=None, ge=10, le=20_000)
    #: The model's context window in tokens, if not PROMPTQ_CONTEXT_WINDOW_TOKENS.
    context_window: int | None = Field(default=None, ge=512, le=10_000_000)
    #: "markdown" splits along headings; "text" along paragraphs and sentences.
    format: Literal["text", "markdown"] | None = None
    #: Where the document came from (an uploaded file's name), for people reading the job.
    filename: str | None = Field(default=None, max_length=1000)

    @field_validator("document")
    @classmethod
    def _has_text(cls, document: str) -> str:
        if document and not has_text(document):
            raise ValueError(
                "the document is only whitespace (or invisible characters); there is nothing "
                "to summarize"
            )
        return document

    def job_input(self) -> dict[str, Any]:
        """The `jobs.input` JSON for this request (options left unset are left out)."""
        options = {
            "style": self.style,
            "target_words": self.target_words,
            "context_window": self.context_window,
            "format": self.format,
            "filename": self.filename,
        }
        return {
            "document": self.document,
            "instructions": self.instructions,
            "params": self.params.model_dump(exclude_none=True),
        } | {k: v for k, v in options.items() if v is not None}


JobCreate = Annotated[PromptJobCreate | SummarizeJobCreate, Field(discriminator="kind")]
job_create_adapter: TypeAdapter[PromptJobCreate | SummarizeJobCreate] = TypeAdapter(JobCreate)


class Usage(BaseModel):
    """Token usage reported by the model."""

    prompt_tokens: int | None
    completion_tokens: int | None


class Progress(BaseModel):
    """How far a summarize job is: chunks done of those planned at its current level."""

    chunks_done: int
    chunks_total: int
    #: 0 while summarizing the document's chunks, n during the n-th level of reduce calls.
    level: int


class JobOut(BaseModel):
    """A job as the API, the CLI and the Python client show it."""

    id: str
    kind: str
    status: str
    model: str
    attempts: int
    max_attempts: int
    deadline_s: float | None
    deadline_at: datetime | None
    result: str | None
    error: str | None
    error_code: str | None
    finish_reason: str | None
    usage: Usage
    #: What was asked; None in a listing unless it asks for inputs (`include_input=true`).
    input: dict[str, Any] | None
    idempotency_key: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    next_attempt_at: datetime | None
    #: Summarize jobs only; None for other kinds.
    progress: Progress | None = None
    #: The batch the job belongs to, its position there and the caller's id for it.
    batch_id: str | None = None
    batch_index: int | None = None
    custom_id: str | None = None
    #: When a cancel was asked for while the job ran (it is `cancelled` once its worker stops).
    cancel_requested_at: datetime | None = None
    #: A cache hit: the job whose stored answer this one reused (it made no model call). On a
    #: queued job: the identical job in flight whose answer it waits for (single flight).
    cached_from: str | None = None

    @classmethod
    def from_row(
        cls, job: Job, progress: Progress | None = None, *, with_input: bool = True
    ) -> JobOut:
        """Build from a `jobs` row (and, for a summarize job, its progress)."""
        return cls(
            id=job.id,
            kind=job.kind,
            status=job.status,
            model=job.model,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            deadline_s=job.deadline_s,
            deadline_at=job.deadline_at,
            result=job.result,
            error=job.error,
            error_code=job.error_code,
            finish_reason=job.finish_reason,
            usage=Usage(prompt_tokens=job.prompt_tokens, completion_tokens=job.completion_tokens),
            input=job.input if with_input else None,
            idempotency_key=job.idempotency_key,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            next_attempt_at=job.next_attempt_at,
            progress=progress,
            batch_id=job.batch_id,
            batch_index=job.batch_index,
            custom_id=job.custom_id,
            cancel_requested_at=job.cancel_requested_at,
            cached_from=job.cached_from,
        )


class AttemptOut(BaseModel):
    """One attempt as the API shows it."""

    job_id: str
    number: int
    outcome: str
    status_code: int | None
    error: str | None
    latency_ms: int | None
    worker: str | None
    model: str | None
    usage: Usage
    started_at: datetime
    finished_at: datetime | None

    @classmethod
    def from_row(cls, attempt: JobAttempt) -> AttemptOut:
        """Build from a `job_attempts` row."""
        return cls(
            job_id=attempt.job_id,
            number=attempt.number,
            outcome=attempt.outcome,
            status_code=attempt.status_code,
            error=attempt.error,
            latency_ms=attempt.latency_ms,
            worker=attempt.worker,
            model=attempt.model,
            usage=Usage(
                prompt_tokens=attempt.prompt_tokens, completion_tokens=attempt.completion_tokens
            ),
            started_at=attempt.started_at,
            finished_at=attempt.finished_at,
        )


class JobPage(BaseModel):
    """One page of a job listing; pass `next_cursor` back to get the next."""

    jobs: list[JobOut]
    next_cursor: str | None
