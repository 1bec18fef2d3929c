"""Validating an OpenAI Batch API input file, the way OpenAI does: every line is checked, and
a bad file fails the batch with one error per bad line (`{"code", "message", "param", "line"}`).

A line is `{"custom_id", "method": "POST", "url": <the batch's endpoint>, "body": {...}}`, the
body a chat completion request (no streaming). custom_ids must be unique within the file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from promptq.errors import InvalidRequest, LimitExceeded
from promptq.input_limits import check_messages
from promptq.openai_schemas import ChatCompletionRequest
from promptq.service import check_storable, describe_validation_error
from promptq.settings import Settings

#: The endpoints a batch may target.
ENDPOINTS = ("/v1/chat/completions",)
COMPLETION_WINDOWS = ("24h",)
#: Most requests one batch may hold (OpenAI's limit).
MAX_REQUESTS = 50_000
#: Errors reported per file; the rest are counted in the last one.
MAX_ERRORS = 100
MAX_CUSTOM_ID_CHARS = 255


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """One valid input line."""

    line: int
    custom_id: str
    body: ChatCompletionRequest


@dataclass(slots=True)
class InputCheck:
    """The valid requests of a file, and the errors of its bad lines."""

    requests: list[BatchRequest] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_count: int = 0

    def fail(self, line: int | None, code: str, message: str, param: str | None = None) -> None:
        """Record one problem (the first MAX_ERRORS are listed)."""
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})

    def reject_models(self, unknown: set[str]) -> None:
        """Turn the requests naming a model in `unknown` into per-line errors."""
        kept = []
        for request in self.requests:
            missing = [m for m in _models(request.body) if m in unknown]
            if missing:
                self.fail(
                    request.line,
                    "model_not_found",
                    f"the model {missing[0]!r} is not served by the model endpoint",
                    "body.model",
                )
            else:
                kept.append(request)
        self.requests = kept
        self.errors.sort(key=lambda e: e["line"] or 0)

    def errors_object(self) -> dict[str, Any]:
        """OpenAI's `errors` of a failed batch."""
        errors = list(self.errors)
        if self.error_count > len(errors):
            errors.append(
                {
                    "code": "too_many_errors",
                    "message": f"{self.error_count - len(errors)} more error(s) not listed",
                    "param": None,
                    "line": None,
                }
            )
        return {"object": "list", "data": errors}


def check_input(
    content: bytes,
    endpoint: str,
    known_models: set[str] | None,
    *,
    settings: Settings | None = None,
) -> InputCheck:
    """Check every line of an input file. `known_models` None skips the model check;
    `settings` holds the per-job message limits (None skips them)."""
    check = InputCheck()
    seen: set[str] = set()
    lines = content.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        request = _check_line(check, number, raw, endpoint)
        if request is None:
            continue
        if request.custom_id in seen:
            check.fail(
                number,
                "duplicate_custom_id",
                f"custom_id {request.custom_id!r} is used by an earlier line; each must be unique",
                "custom_id",
            )
            continue
        seen.add(request.custom_id)
        if settings is not None:
            try:
                check_messages(request.body.job_input()["messages"], settings)
            except LimitExceeded as exc:
                check.fail(number, "limit_exceeded", exc.message, "body.messages")
                continue
        if known_models is not None:
            missing = [m for m in _models(request.body) if m not in known_models]
            if missing:
                check.fail(
                    number,
                    "model_not_found",
                    f"the model {missing[0]!r} is not served by the model endpoint",
                    "body.model",
                )
                continue
        check.requests.append(request)
    if not check.requests and not check.error_count:
        check.fail(None, "empty_file", "the input file has no requests")
    if len(check.requests) > MAX_REQUESTS:
        check.fail(None, "too_many_requests", f"a batch may hold at most {MAX_REQUESTS} requests")
    return check


def _models(body: ChatCompletionRequest) -> Iterable[str]:
    return [body.model, *body.fallback_models]


def _check_line(check: InputCheck, number: int, raw: bytes, endpoint: str) -> BatchRequest | None:
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        check.fail(number, "invalid_json_line", "this line is not valid JSON")
        return None
    if not isinstance(line, dict):
        check.fail(number, "invalid_json_line", "each line must be a JSON object")
        return None
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        check.fail(number, "missing_required_parameter", "custom_id must be a string", "custom_id")
        return None
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        check.fail(
            number,
            "invalid_value",
            f"custom_id is longer than {MAX_CUSTOM_ID_CHARS} characters",
            "custom_id",
        )
        return None
    if "\x00" in custom_id:  # PostgreSQL cannot store U+0000 in text
        check.fail(
            number,
            "invalid_value",
            "custom_id may not contain NUL (\\u0000) characters",
            "custom_id",
        )
        return None
    if line.get("method") != "POST":
        check.fail(number, "invalid_value", "method must be POST", "method")
        return None
    if line.get("url") != endpoint:
        check.fail(
            number,
            "invalid_url",
            f"url must be the batch's endpoint {endpoint}; got {str(line.get('url'))[:64]!r}",
            "url",
        )
        return None
    body = line.get("body")
    if not isinstance(body, dict):
        check.fail(number, "invalid_request", "body must be a JSON object", "body")
        return None
    try:
        check_storable(body)
        request = ChatCompletionRequest.model_validate(body)
    except InvalidRequest as exc:
        check.fail(number, "invalid_request", exc.message, "body")
        return None
    except ValidationError as exc:
        check.fail(number, "invalid_request", describe_validation_error(exc), "body")
        return None
    if request.stream:
        check.fail(number, "invalid_value", "stream is not supported in a batch", "body.stream")
        return None
    return BatchRequest(line=number, custom_id=custom_id, body=request)
