"""The one Settings object: built once per entrypoint from `PROMPTQ_*` env vars and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All of promptq's configuration. Nothing else reads the environment."""

    model_config = SettingsConfigDict(
        env_prefix="PROMPTQ_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        allow_inf_nan=False,  # an infinite timeout overflows aiohttp's timers; NaN is no number
    )

    data_dir: Path = Path(".promptq")
    #: SQLAlchemy async URL; empty means SQLite (aiosqlite) at `<data_dir>/promptq.db`.
    database_url: str = ""
    redis_url: str = "redis://localhost:6379/0"
    #: Redis key prefix for everything promptq stores (queue, locks, limits).
    queue_name: str = "promptq:queue"

    llm_base_url: str = "http://localhost:11434/v1"
    llm_api_key: SecretStr | None = None
    default_model: str = "llama3.2"
    llm_timeout_s: float = Field(default=120.0, gt=0)
    #: `promptq demo`/`up` with no LLM configured and no Ollama: start the bundled local model
    #: (the `local` extra) instead of going straight to the built-in fake one.
    bundled_llm: bool = True
    #: Endpoints and their limits (see promptq.endpoints): a TOML file, or the same as JSON.
    #: Without either, every model goes to PROMPTQ_LLM_BASE_URL without limits.
    endpoints_file: Path | None = None
    endpoints: str = ""
    #: How long a job waits in a worker slot for its endpoint's limits to let it call, before
    #: it goes back to the queue (uncharged) so that the slot can run another model's job.
    limit_wait_s: float = Field(default=0.5, ge=0)

    #: `promptq api` and `promptq worker` run on uvloop's event loop when it is installed.
    uvloop: bool = True
    #: Database connections a process keeps open (more are opened for a burst and closed
    #: after); unset: 10 for the API and the CLI, and for a worker its concurrency + prefetch
    #: + 4, so that its jobs never open and close connections as they go.
    db_pool_size: int | None = Field(default=None, ge=1, le=1_000)
    #: Jobs one worker works on with the model at once (its model slots).
    worker_concurrency: int = Field(default=10, ge=1, le=10_000)
    #: Jobs a worker takes ahead, claimed and waiting for a model slot, so that a freed slot
    #: starts its next call at once (worker.slots); unset: half the concurrency, rounded up.
    worker_prefetch: int | None = Field(default=None, ge=0, le=10_000)
    #: Fallback poll interval. Enqueues and freed slots wake a worker at once, and it wakes when
    #: a deferred job falls due; this poll only catches what a lost wake-up message missed.
    worker_poll_delay_s: float = Field(default=0.5, gt=0)
    #: On SIGTERM/SIGINT, how long in-flight jobs may run on before they are handed back.
    worker_grace_s: float = Field(default=30.0, ge=0)
    #: A running attempt's lease; its worker renews it every lease_s/3. A job whose lease has
    #: run out is presumed orphaned and runs again elsewhere. With the reconcile interval this
    #: bounds crash recovery: a killed worker's jobs run again within lease_s +
    #: reconcile_interval_s (8 s at the defaults) plus a poll.
    lease_s: float = Field(default=6.0, ge=0.3)
    #: How often the reconciler looks for orphaned jobs and jobs that Redis lost.
    reconcile_interval_s: float = Field(default=2.0, gt=0)

    #: How long a worker keeps retrying a write of an attempt's outcome while the database is
    #: unreachable, before it gives up (and the job runs again once its lease runs out).
    db_retry_s: float = Field(default=300.0, ge=0)

    max_attempts: int = Field(default=5, ge=1, le=100)
    #: Backoff: full jitter on `retry_base_s * 2**(attempt-1)`, capped at `retry_cap_s`.
    retry_base_s: float = Field(default=1.0, ge=0)
    retry_cap_s: float = Field(default=60.0, ge=0)
    #: A Retry-After longer than this is clamped, so a hostile header can't park a job for days.
    retry_after_cap_s: float = Field(default=600.0, ge=0)

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=0, le=65535)
    #: Largest accepted HTTP request body.
    api_max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    #: Serve the API without API keys: every caller is an admin. Local development only.
    auth_disabled: bool = False
    #: How long the API trusts a key it has looked up; a revoked key works at most this long.
    api_key_cache_s: float = Field(default=30.0, ge=0)
    #: On SIGTERM, how long requests still running may finish (api.shutdown): below Docker's
    #: and Kubernetes' 10 s / 30 s before they kill.
    api_shutdown_grace_s: float = Field(default=5.0, ge=0, le=300)

    #: Most messages one prompt job may carry.
    max_messages_per_job: int = Field(default=1000, ge=1)
    #: Most characters of text in one prompt job's messages, all together.
    max_message_chars: int = Field(default=1_000_000, ge=1000)
    #: Largest document accepted for summarizing: an uploaded file, or a JSON `document`.
    max_document_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    #: Largest multipart upload (all its files together) `POST /api/jobs/summarize/upload` reads.
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)

    #: Most jobs one batch may create (items x models of a comparison batch).
    batch_max_items: int = Field(default=100_000, ge=1)
    #: Largest JSONL batch upload (`POST /api/batches`); it is spooled to a temporary file.
    batch_max_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)

    #: The model's context window; a summarize job's `context_window` overrides it.
    context_window_tokens: int = Field(default=8192, ge=512)
    #: Calibration of the offline token estimate (see promptq.tokens): characters per token.
    chars_per_token: float = Field(default=4.0, gt=0)
    #: LLM calls one summarize job makes at once (its map fan-out).
    summary_fanout: int = Field(default=4, ge=1, le=256)
    #: Deepest reduce level a summarize job may reach before it fails as non-converging.
    summary_max_depth: int = Field(default=4, ge=1, le=16)
    #: Tokens consecutive chunks share, so a sentence cut at a boundary is seen whole once.
    summary_overlap_tokens: int = Field(default=64, ge=0)
    #: A prompt counts as silently truncated when the model reports fewer prompt tokens than
    #: this fraction of the local estimate (0 turns the check off).
    truncation_ratio: float = Field(default=0.7, ge=0, lt=1)
    #: Longest a summarize attempt may run (arq's job timeout); finished chunks survive it.
    summary_timeout_s: float = Field(default=3600.0, gt=0)
    #: Stream the final summary's tokens to `GET /api/jobs/{id}/stream` subscribers.
    summary_stream_final: bool = True

    #: Reuse the stored result of an identical earlier request (same owner, model, messages and
    #: params) for deterministic requests (temperature 0 or a seed) and those asking `cache`.
    cache_enabled: bool = True
    #: How long the backend's model list (`GET /v1/models`, the model check) is reused.
    models_cache_s: float = Field(default=5.0, ge=0)
    #: Longest `POST /v1/chat/completions` waits for its job before answering 504 (the job
    #: itself goes on; read it at /api/jobs/{id}).
    chat_wait_s: float = Field(default=600.0, gt=0)

    log_level: str = "INFO"
    #: `console` (human-readable) or `json` (one object per line, for log shippers).
    log_format: Literal["console", "json"] = "console"
    #: A worker serves Prometheus metrics on this port (`--metrics-port`); None: it doesn't.
    worker_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    worker_metrics_host: str = "127.0.0.1"
    #: How often a worker refreshes its heartbeat key (`promptq worker --check` reads it);
    #: the key expires after three missed beats.
    worker_heartbeat_s: float = Field(default=5.0, gt=0)
    #: Seconds a scrape reuses what `/metrics` read from SQL, Redis and the limiter.
    metrics_refresh_s: float = Field(default=2.0, ge=0)

    @field_validator("llm_base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    def with_overrides(self, **changes: Any) -> Settings:
        """A validated copy with some fields changed (model_copy would skip validation).

        The copy remembers which fields the user set (env, .env, or these changes), so that a
        default stays a default: `promptq demo` only starts its own Redis in that case.
        """
        values = {name: getattr(self, name) for name in type(self).model_fields} | changes
        copy = type(self)(_env_file=None, **values)
        object.__setattr__(copy, "__pydantic_fields_set__", self.model_fields_set | set(changes))
        return copy

    @property
    def prefetch(self) -> int:
        """Jobs a worker takes ahead of its model slots (worker_prefetch, or its default)."""
        if self.worker_prefetch is not None:
            return self.worker_prefetch
        return -(-self.worker_concurrency // 2)

    @property
    def resolved_database_url(self) -> str:
        """The database URL in use: the configured one, or SQLite in the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'promptq.db').resolve()}"
