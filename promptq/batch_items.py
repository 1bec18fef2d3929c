"""Reading a batch's items: validate every one first, then hand them out ready to insert.

A batch is all or nothing: `validate_jsonl` reads an upload once, collecting per-line errors
(line number + message), and only when every line is valid does anything get written. It writes
each item, already normalized, to a second spool file as one JSON line, so the insert pass reads
cheap JSON instead of validating again, and memory stays flat however many items there are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
from pydantic import ValidationError

from promptq.errors import BatchTooLarge, InvalidBatch, InvalidRequest
from promptq.schemas import PromptJobCreate, SummarizeJobCreate, job_create_adapter
from promptq.service import (
    MAX_JSON_DEPTH,
    check_storable,
    describe_validation_error,
    parse_job_request,
)

logger = logging.getLogger(__name__)

#: Invalid lines listed in a 422; the message still counts them all.
MAX_LINE_ERRORS = 100
#: Longest `custom_id` (the column's size).
MAX_CUSTOM_ID_CHARS = 255
#: Most models in one comparison batch.
MAX_MODELS = 16
#: Largest batch `metadata` (serialized).
MAX_METADATA_BYTES = 16 * 1024

JobRequest = PromptJobCreate | SummarizeJobCreate
Check = Callable[[JobRequest], None]


@dataclass(frozen=True, slots=True)
class ItemSpec:
    """One validated batch item, as it will be stored (the model may still be the default)."""

    kind: str
    model: str | None
    input: dict[str, Any]
    max_attempts: int | None
    deadline_s: float | None
    idempotency_key: str | None
    custom_id: str | None = None
    #: The request's `cache` choice (prompt jobs; see promptq.cache).
    cache: bool | None = None

    @classmethod
    def from_request(cls, request: JobRequest, custom_id: str | None = None) -> ItemSpec:
        """The item for a validated job request (what `POST /api/jobs` accepts)."""
        return cls(
            kind=request.kind,
            model=request.model,
            input=request.job_input(),
            max_attempts=request.max_attempts,
            deadline_s=request.deadline_s,
            idempotency_key=request.idempotency_key,
            custom_id=custom_id,
            cache=request.cache if isinstance(request, PromptJobCreate) else None,
        )

    def to_json(self) -> bytes:
        """One spool line."""
        return orjson.dumps(
            [
                self.kind,
                self.model,
                self.input,
                self.max_attempts,
                self.deadline_s,
                self.idempotency_key,
                self.custom_id,
                self.cache,
            ]
        )

    @classmethod
    def from_json(cls, line: bytes) -> ItemSpec:
        """Read back a spool line written by to_json."""
        return cls(*orjson.loads(line))


@dataclass(slots=True)
class Validation:
    """What a validation pass found: how many items, and the first errors."""

    items: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_count: int = 0
    _keys: dict[str, int] = field(default_factory=dict)

    def add_error(self, line: int, message: str) -> None:
        """Record one invalid item (only the first MAX_LINE_ERRORS are kept)."""
        self.error_count += 1
        if len(self.errors) < MAX_LINE_ERRORS:
            self.errors.append({"line": line, "message": message})

    def raise_if_invalid(self) -> None:
        """InvalidBatch listing the errors, or nothing when every item was valid."""
        if not self.error_count:
            if not self.items:
                raise InvalidBatch("the batch has no items; send at least one job")
            return
        first = "; ".join(f"line {e['line']}: {e['message']}" for e in self.errors[:3])
        more = self.error_count - min(3, len(self.errors))
        tail = f" (and {more} more)" if more else ""
        raise InvalidBatch(
            f"{self.error_count} of {self.items} item(s) are invalid; nothing was created. "
            f"{first}{tail}",
            lines=self.errors,
        )


def check_models(models: list[str] | None) -> list[str] | None:
    """The distinct models of a comparison batch, in order; None for an ordinary batch."""
    if models is None:
        return None
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise InvalidRequest("models must be a list of model names")
    distinct = list(dict.fromkeys(m.strip() for m in models if m.strip()))
    if not distinct:
        raise InvalidRequest("models must name at least one model")
    if len(distinct) > MAX_MODELS:
        raise InvalidRequest(f"a comparison batch may name at most {MAX_MODELS} models")
    for model in distinct:
        if "\x00" in model:
            raise InvalidRequest("model names may not contain NUL (\\u0000) characters")
        if len(model) > 255:
            raise InvalidRequest(f"model name {model[:64]!r}... is longer than 255 characters")
    return distinct


def check_metadata(metadata: Any) -> dict[str, Any] | None:
    """Free-form batch metadata: a JSON object of at most MAX_METADATA_BYTES, storable."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidRequest("metadata must be a JSON object")
    check_storable(metadata)
    if len(orjson.dumps(metadata)) > MAX_METADATA_BYTES:
        raise InvalidRequest(f"metadata may be at most {MAX_METADATA_BYTES} bytes of JSON")
    return metadata


def check_name(name: Any) -> str | None:
    """A batch name: a string of at most 255 characters, or None."""
    if name is None or name == "":
        return None
    if not isinstance(name, str) or len(name) > 255 or "\x00" in name:
        raise InvalidRequest("name must be a string of at most 255 characters")
    return name


def plainly_storable(raw: bytes) -> bool:
    """True when a JSON line certainly passes `check_storable`: it escapes no NUL and has too
    few brackets to nest deeper than MAX_JSON_DEPTH. (Most lines; the rest get the full walk.)"""
    return b"\\u0000" not in raw and raw.count(b"{") + raw.count(b"[") <= MAX_JSON_DEPTH


def parse_item(
    payload: Any, check: Check, *, multiplier: int = 1, storable: bool = False
) -> tuple[JobRequest, str | None]:
    """Validate one item: a job request object, optionally with a `custom_id`.

    `storable` says the item is known to pass `check_storable` (see plainly_storable).
    Raises InvalidRequest with a message that says what is wrong with it.
    """
    if not isinstance(payload, dict):
        raise InvalidRequest("each item must be a JSON object (a job request)")
    custom_id = payload.get("custom_id")
    if "custom_id" in payload:
        payload = {k: v for k, v in payload.items() if k != "custom_id"}
        if (
            not isinstance(custom_id, str)
            or not 1 <= len(custom_id) <= MAX_CUSTOM_ID_CHARS
            or "\x00" in custom_id
        ):
            raise InvalidRequest(
                f"custom_id must be a string of 1-{MAX_CUSTOM_ID_CHARS} characters"
            )
    if storable:
        try:
            request = job_create_adapter.validate_python(payload)
        except ValidationError as exc:
            raise InvalidRequest(describe_validation_error(exc)) from None
    else:
        request = parse_job_request(payload)
    check(request)
    key = request.idempotency_key
    # In a comparison batch each model's job gets `<key>:<model>`: it must still fit the column.
    if multiplier > 1 and key is not None and len(key) > 200:
        raise InvalidRequest("idempotency_key may be at most 200 characters in a comparison batch")
    return request, custom_id


class ItemValidator:
    """Validates items one by one, tracking counts, limits and duplicate idempotency keys."""

    def __init__(self, check: Check, *, max_jobs: int, models: list[str] | None) -> None:
        self.check = check
        self.max_jobs = max_jobs
        self.multiplier = len(models) if models else 1
        self.report = Validation()

    def feed(self, line: int, payload: Any, *, storable: bool = False) -> ItemSpec | None:
        """Validate one item; the ItemSpec, or None (the error is recorded)."""
        report = self.report
        report.items += 1
        if report.items * self.multiplier > self.max_jobs:
            per = f" x {self.multiplier} models" if self.multiplier > 1 else ""
            raise BatchTooLarge(
                f"the batch has more than {self.max_jobs // self.multiplier} items{per}; "
                f"a batch may create at most {self.max_jobs} jobs (PROMPTQ_BATCH_MAX_ITEMS). "
                "Split it into several batches."
            )
        try:
            request, custom_id = parse_item(
                payload, self.check, multiplier=self.multiplier, storable=storable
            )
        except InvalidRequest as exc:
            report.add_error(line, exc.message)
            return None
        key = request.idempotency_key
        if key is not None:
            first = report._keys.setdefault(key, line)
            if first != line:
                report.add_error(line, f"idempotency_key {key[:64]!r} is also used on line {first}")
                return None
        return ItemSpec.from_request(request, custom_id)


def validate_jsonl(
    source: IO[bytes],
    spool: IO[bytes],
    check: Check,
    *,
    max_jobs: int,
    models: list[str] | None,
) -> Validation:
    """Validate every line of a JSONL upload, writing each valid item to `spool`.

    Blank lines are skipped (they still count for line numbers). Raises BatchTooLarge as soon
    as the item limit is passed; the caller raises the returned report's errors.
    """
    validator = ItemValidator(check, max_jobs=max_jobs, models=models)
    for number, raw in enumerate(source, start=1):
        if not raw.strip():
            continue
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            validator.report.items += 1
            validator.report.add_error(number, f"not valid JSON: {exc}")
            continue
        spec = validator.feed(number, payload, storable=plainly_storable(raw))
        if spec is not None and not validator.report.error_count:
            spool.write(spec.to_json())
            spool.write(b"\n")
    return validator.report


def validate_list(
    items: Any, check: Check, *, max_jobs: int, models: list[str] | None
) -> list[ItemSpec]:
    """Validate the `jobs` list of a JSON body (item n is "line" n, counting from 1)."""
    if not isinstance(items, list):
        raise InvalidRequest('the body must be {"jobs": [<job request>, ...]}')
    validator = ItemValidator(check, max_jobs=max_jobs, models=models)
    specs = [validator.feed(number, item) for number, item in enumerate(items, start=1)]
    validator.report.raise_if_invalid()
    return [spec for spec in specs if spec is not None]


def read_spool(spool: IO[bytes]) -> Iterator[ItemSpec]:
    """The items a validation pass wrote, in order."""
    spool.seek(0)
    for line in spool:
        yield ItemSpec.from_json(line)
