"""promptq's exception tree. Every message says what went wrong and what to do about it.

PromptQError
├── InvalidRequest          bad input from a user (HTTP 400/422, CLI exit 2)
│   ├── IdempotencyConflict same idempotency_key, different request (409)
│   ├── DocumentTooLarge    a document over PROMPTQ_MAX_DOCUMENT_BYTES (413)
│   ├── LimitExceeded       too many messages or characters in a job (413)
│   ├── BatchTooLarge       a batch over PROMPTQ_BATCH_MAX_ITEMS / _BYTES (413)
│   ├── InvalidBatch        a batch with invalid items, listed per line (422)
│   └── UnsupportedDocument a file type promptq cannot read, or a file it cannot parse (422)
├── Unauthorized            missing, invalid or revoked API key (401)
├── NotFound                no such job, or not yours (404)
├── JobNotRetryable         only failed or cancelled jobs can be retried (409)
├── NotCancellable          a finished job or batch cannot be cancelled (409)
├── ServiceUnavailable      Redis or the database is unreachable (503)
├── ClaimLost               a worker's attempt was overtaken (job cancelled or reclaimed)
├── ConfigError             a configuration file or variable is invalid (CLI exit 1)
└── LLMError                a call to the model endpoint failed
    ├── TransientLLMError   worth retrying: 408/409/429/5xx, timeouts, bad bodies
    │   └── PromptTruncated the model evidently saw only part of the prompt
    └── PermanentLLMError   retrying can't help: other 4xx, context length
        └── SummaryFailed   a document cannot be summarized with these settings
"""

from __future__ import annotations

from typing import ClassVar


class PromptQError(Exception):
    """Something promptq could not do."""

    #: Machine-readable code used in `{"error": {"code", "message"}}`.
    code: ClassVar[str] = "error"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or self.code).strip())

    @property
    def message(self) -> str:
        """The human-readable message."""
        return str(self.args[0])


class InvalidRequest(PromptQError):
    """The request is not valid."""

    code = "invalid_request"
    http_status = 422


class IdempotencyConflict(InvalidRequest):
    """This idempotency_key was already used for a different request."""

    code = "idempotency_conflict"
    http_status = 409


class DocumentTooLarge(InvalidRequest):
    """The document is larger than this server accepts."""

    code = "document_too_large"
    http_status = 413


class LimitExceeded(InvalidRequest):
    """The request carries more than this server accepts (messages, characters)."""

    code = "limit_exceeded"
    http_status = 413


class UnsupportedDocument(InvalidRequest):
    """The document's type is not supported, or its contents cannot be read."""

    code = "unsupported_document"
    http_status = 422


class BatchTooLarge(InvalidRequest):
    """The batch has more items, or more bytes, than this server accepts."""

    code = "batch_too_large"
    http_status = 413


class InvalidBatch(InvalidRequest):
    """Some items of the batch are invalid; nothing was created."""

    code = "invalid_batch"
    http_status = 422

    def __init__(self, message: str, *, lines: list[dict[str, object]] | None = None) -> None:
        super().__init__(message)
        #: `{"line": n, "message": ...}` for the first invalid items (1-based line numbers).
        self.lines = lines or []


class Unauthorized(PromptQError):
    """A valid API key is required: send `Authorization: Bearer <key>`."""

    code = "unauthorized"
    http_status = 401


class NotFound(PromptQError):
    """No such object."""

    code = "not_found"
    http_status = 404


class JobNotRetryable(PromptQError):
    """Only failed or cancelled jobs can be retried."""

    code = "not_retryable"
    http_status = 409


class NotCancellable(PromptQError):
    """Only queued, retrying or running jobs (and unfinished batches) can be cancelled."""

    code = "not_cancellable"
    http_status = 409


class ServiceUnavailable(PromptQError):
    """A backing service (Redis or the database) is unreachable; try again shortly."""

    code = "service_unavailable"
    http_status = 503


class ClaimLost(PromptQError):
    """The job moved on without this attempt: it was cancelled or another worker took it over."""

    code = "claim_lost"
    http_status = 409


class ConfigError(PromptQError):
    """The configuration is invalid; the message names the file or variable and the field."""

    code = "config_error"
    http_status = 500


class LLMError(PromptQError):
    """The call to the model endpoint failed."""

    code = "llm_error"
    http_status = 502

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after_s = retry_after_s


class TransientLLMError(LLMError):
    """The model endpoint failed in a way that a later attempt may not."""

    code = "llm_transient"


class PermanentLLMError(LLMError):
    """The model endpoint rejected the request; retrying it unchanged cannot succeed."""

    code = "llm_permanent"


class PromptTruncated(TransientLLMError):
    """The model reported far fewer prompt tokens than were sent: it silently cut the prompt."""

    code = "prompt_truncated"


class SummaryFailed(PermanentLLMError):
    """The document cannot be summarized with these settings (window too small, too deep)."""

    code = "summary_failed"
