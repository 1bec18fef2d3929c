"""SQL tables. This schema is a public interface: users query `jobs`, `job_attempts` and
`job_chunks` directly."""

from __future__ import annotations

import builtins
import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class JobStatus(enum.StrEnum):
    """Where a job is in its life. Terminal: succeeded, failed, cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True once the job will never run again."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class JobKind(enum.StrEnum):
    """What a job asks the model to do."""

    PROMPT = "prompt"
    SUMMARIZE = "summarize"


class ChunkStatus(enum.StrEnum):
    """Where one chunk summary of a summarize job is. Only `done` rows carry a summary."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    #: The last call for this chunk failed; a later attempt calls again.
    FAILED = "failed"
    #: The model evidently saw only part of the prompt; its answer was thrown away.
    TRUNCATED = "truncated"
    #: Not part of the job's current plan (the chunks were cut again, smaller).
    SUPERSEDED = "superseded"


class AttemptOutcome(enum.StrEnum):
    """How one attempt ended. `running` means it has not ended (yet)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    TRANSIENT_ERROR = "transient_error"
    PERMANENT_ERROR = "permanent_error"
    INTERRUPTED = "interrupted"
    #: Aborted because someone cancelled the job while this attempt ran.
    CANCELLED = "cancelled"


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use promptq.clock.now()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    """Declarative base carrying the constraint naming convention alembic relies on."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ApiKey(Base):
    """An API key. Only the SHA-256 of the key is stored; the key itself is shown once."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    #: Unique forever, revoked keys included, so that a name always means one key.
    name: Mapped[str] = mapped_column(String(64), unique=True)
    #: The key's first characters: not secret, enough for a person to tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16))
    #: Hex SHA-256 of the whole key; a request's key is looked up by it.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    #: Admin keys see and read every job; other keys only their own.
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class BatchStatus(enum.StrEnum):
    """Where a batch is. Native batches use in_progress / cancelling / cancelled / completed;
    OpenAI Batch API batches use the whole OpenAI lifecycle."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class Priority(enum.IntEnum):
    """Queue priority of a job: higher runs first when workers are saturated."""

    BULK = 0
    INTERACTIVE = 10


class Batch(Base):
    """Many jobs submitted together (`POST /api/batches`, the CLI, or the OpenAI Batch API).

    Counts per status are computed from `jobs.batch_id`, never stored, so they cannot drift.
    """

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    #: "native" (promptq's /api/batches and CLI) or "openai" (the /v1 Batch API).
    api: Mapped[str] = mapped_column(String(16), default="native")
    name: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default=BatchStatus.IN_PROGRESS)
    #: Items (jobs) in the batch once it is accepted.
    job_count: Mapped[int] = mapped_column(Integer, default=0)
    #: The distinct models of a comparison batch (each item runs on each); NULL otherwise.
    models: Mapped[list[str] | None] = mapped_column(JSONType)
    #: Free-form user metadata (OpenAI's `metadata`), at most a few KB.
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONType)
    owner_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="RESTRICT"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: Past this, unfinished jobs are cancelled and the batch is `expired` (NULL: never).
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The OpenAI Batch API's fields (NULL for native batches):
    #: The `files` row the batch was made from, and those of its results and failed requests.
    input_file_id: Mapped[str | None] = mapped_column(String(64))
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    #: The endpoint every request goes to ("/v1/chat/completions").
    endpoint: Mapped[str | None] = mapped_column(String(64))
    completion_window: Mapped[str | None] = mapped_column(String(16))
    #: Why the batch failed validation: OpenAI's `{"object": "list", "data": [...]}`.
    errors: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    in_progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finalizing_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancelling_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_batches_owner_key_id_id", "owner_key_id", "id"),)


class File(Base):
    """A file of the OpenAI Files API: a batch's input (`purpose="batch"`) or its results."""

    __tablename__ = "files"

    #: "file-" + a time-ordered UUID, so ids sort by creation time.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="RESTRICT"))
    #: "batch" (uploaded), "batch_output" (results, written by promptq).
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(Integer)
    content: Mapped[builtins.bytes] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16), default="processed")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_files_owner_key_id_id", "owner_key_id", "id"),)


class Job(Base):
    """One unit of LLM work and its outcome. SQL is the source of truth for its state."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    model: Mapped[str] = mapped_column(String(255))
    #: The request: `messages` + `params` for prompt jobs, `document` + `instructions` otherwise.
    input: Mapped[dict[str, Any]] = mapped_column(JSONType)
    result: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    #: Attempts started, one per `job_attempts` row, including interrupted ones.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: Attempts cut short by a worker stopping or dying; they don't count against max_attempts.
    interruptions: Mapped[int] = mapped_column(Integer, default=0)
    #: Cap on charged attempts (attempts - interruptions). A retry raises it by attempt_budget.
    max_attempts: Mapped[int] = mapped_column(Integer)
    #: Charged attempts each run gets: the request's max_attempts.
    attempt_budget: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    #: Summarize jobs: the fraction of the computed chunk size in use; each silently truncated
    #: prompt shrinks it for the next attempt. NULL means 1 (never shrunk).
    chunk_scale: Mapped[float | None] = mapped_column(Float)
    #: The API key that created the job; NULL when made by the CLI or with auth disabled.
    owner_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="RESTRICT"))
    #: Unique per owner (see the two partial unique indexes below).
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    #: While running: the attempt is presumed alive until then; after it, another worker may
    #: take the job over and record the attempt as interrupted.
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: The request's overall wall-clock budget, counted from creation (or from a retry).
    deadline_s: Mapped[float | None] = mapped_column(Float)
    #: Past this, the job fails instead of starting or scheduling another attempt.
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: When a retrying job becomes due again.
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: The batch the job belongs to, if any, and its position there (submission order). In a
    #: comparison batch the jobs of one prompt on several models share a batch_index.
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    batch_index: Mapped[int | None] = mapped_column(Integer)
    #: The caller's own id for the item (OpenAI Batch API `custom_id`).
    custom_id: Mapped[str | None] = mapped_column(String(255))
    #: Priority.BULK or Priority.INTERACTIVE; higher goes first.
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    #: sha256 hex of (kind, model, messages/document, params): identical requests share it.
    request_hash: Mapped[str | None] = mapped_column(String(64))
    #: The job whose stored result this one reused instead of calling the model (a cache hit).
    cached_from: Mapped[str | None] = mapped_column(String(36))
    #: Set when a cancel is asked for while the job runs; the worker aborts the attempt.
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("ix_jobs_status_id", "status", "id"),
        Index("ix_jobs_batch_id_batch_index", "batch_id", "batch_index"),
        # A batch's jobs, newest first (list_jobs); single jobs, most of them, are left out.
        Index(
            "ix_jobs_batch_id_id",
            "batch_id",
            "id",
            sqlite_where=text("batch_id IS NOT NULL"),
            postgresql_where=text("batch_id IS NOT NULL"),
        ),
        Index("ix_jobs_request_hash", "request_hash"),
        Index("ix_jobs_kind_id", "kind", "id"),
        Index("ix_jobs_owner_key_id_id", "owner_key_id", "id"),
        # The dashboard chart counts the jobs finished within its window.
        Index("ix_jobs_finished_at", "finished_at"),
        # An idempotency key is unique per owner. A plain UNIQUE (owner_key_id, idempotency_key)
        # would not do: NULLs are distinct in it (SQLite, and PostgreSQL by default), so unowned
        # jobs could share a key. Hence one partial unique index for owned jobs, one for unowned.
        Index(
            "uq_jobs_owner_key_id_idempotency_key",
            "owner_key_id",
            "idempotency_key",
            unique=True,
            sqlite_where=text("owner_key_id IS NOT NULL"),
            postgresql_where=text("owner_key_id IS NOT NULL"),
        ),
        Index(
            "uq_jobs_unowned_idempotency_key",
            "idempotency_key",
            unique=True,
            sqlite_where=text("owner_key_id IS NULL"),
            postgresql_where=text("owner_key_id IS NULL"),
        ),
    )


class JobAttempt(Base):
    """One try at a job: when, where, how it ended, and how long the model took."""

    __tablename__ = "job_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    outcome: Mapped[str] = mapped_column(String(32), default=AttemptOutcome.RUNNING)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(255))
    model: Mapped[str | None] = mapped_column(String(255))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        UniqueConstraint("job_id", "number"),
        # The dashboard chart's latency per bucket reads the attempts finished in its window.
        Index("ix_job_attempts_finished_at", "finished_at"),
    )


class JobChunk(Base):
    """One LLM call of a summarize job: a map call on a chunk (level 0) or a reduce call on a
    group of summaries (level 1 and up). Finished rows are reused by every later attempt."""

    __tablename__ = "job_chunks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    #: 0 for a map call on a piece of the document, n for the n-th level of reduce calls.
    level: Mapped[int] = mapped_column(Integer)
    #: Position within the level, from 0. (Not `index`: that is an SQL keyword.)
    chunk_index: Mapped[int] = mapped_column(Integer)
    #: sha256 hex of the call's input text: a chunk of the document, or the joined summaries.
    text_hash: Mapped[str] = mapped_column(String(64))
    summary: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    #: LLM calls made for this chunk, across all of the job's attempts.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default=ChunkStatus.PENDING)
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (UniqueConstraint("job_id", "level", "chunk_index", "text_hash"),)
