"""Logging for the `promptq` processes: console or JSON lines, job context, no secrets.

`configure_logging(settings)` installs one stderr handler on the root logger. Every record it
writes carries the job id and attempt number of the job being worked on, if any: the worker
calls `bind_job` as it takes a job, and Python copies context variables into the tasks a job
starts, so a summarize job's fan-out logs carry them too. Secrets are scrubbed from every line
(`Bearer <token>`, promptq API keys, `sk-` keys, passwords in URLs, and the configured LLM key).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from aiohttp.http_exceptions import BadHttpMessage

from promptq.settings import Settings

LogFormat = Literal["console", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("console", "json")

#: The job the current task works on (None outside a job).
JOB_ID: ContextVar[str | None] = ContextVar("promptq_job_id", default=None)
#: Its attempt number, once the attempt is claimed.
ATTEMPT: ContextVar[int | None] = ContextVar("promptq_attempt", default=None)

CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: What a secret looks like in a log line, and what it becomes; each pattern runs only when
#: its marker (lower case) is in the line, so ordinary lines cost a few substring tests.
_SECRET_PATTERNS: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("bearer", re.compile(r"(?i)\b(bearer)\s+[^\s'\",}]+"), r"\1 ***"),
    ("pq_", re.compile(r"\bpq_[A-Za-z0-9_-]{8,}"), "pq_***"),
    ("sk-", re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), "sk-***"),
    (
        "authorization",
        re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)[^'\",}\s]+"),
        r"\1***",
    ),
    # user:password@ and :password@ (Redis's usual form, with no user name)
    ("@", re.compile(r"(://[^/\s:@]*):[^/\s@]+@"), r"\1:***@"),
)


def bind_job(job_id: str | None, attempt: int | None = None) -> None:
    """Tag every later log line of this task (and the tasks it starts) with the job."""
    JOB_ID.set(job_id)
    ATTEMPT.set(attempt)


class Redactor:
    """Replaces secrets in text: known values, and anything shaped like a key or password."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        lowered = text.lower()
        for marker, pattern, replacement in _SECRET_PATTERNS:
            if marker in lowered:
                text = pattern.sub(replacement, text)
        return text


class JobContextFilter(logging.Filter):
    """Adds `job_id` and `attempt` (None outside a job) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = JOB_ID.get()
        record.attempt = ATTEMPT.get()
        return True


class ConsoleFormatter(logging.Formatter):
    """`time LEVEL logger: message [job=... attempt=...]`, secrets scrubbed."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__(CONSOLE_FORMAT)
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job_id = getattr(record, "job_id", None)
        if job_id is not None:
            line += f" [job={job_id} attempt={getattr(record, 'attempt', None)}]"
        return self._redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, job_id, attempt, exc_info."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": self._redact(record.getMessage()),
        }
        job_id = getattr(record, "job_id", None)
        if job_id is not None:
            data["job_id"] = job_id
            data["attempt"] = getattr(record, "attempt", None)
        if record.exc_info:
            data["exc_info"] = self._redact(self.formatException(record.exc_info))
        return orjson.dumps(data).decode()


def configure_logging(settings: Settings, *, stream: Any = None) -> logging.Handler:
    """Send every log record to stderr (or `stream`) in `settings.log_format`."""
    secrets = [settings.llm_api_key.get_secret_value()] if settings.llm_api_key else []
    redact = Redactor(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(JobContextFilter())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(redact))
    else:
        handler.setFormatter(ConsoleFormatter(redact))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server_log.filters):
        server_log.addFilter(MalformedRequestFilter())
    return handler


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (a URL or header over its size limits, an
    encoding it cannot decode, bytes that are not HTTP) at ERROR with a traceback, though the
    client gets its 400 and the server is fine. Logged here as one INFO line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BadHttpMessage):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "refused a malformed HTTP request: %s", (exc.message,)
            record.exc_info = record.exc_text = None
            return logging.getLogger().isEnabledFor(logging.INFO)
        return True
