"""`POST /api/jobs/summarize/upload`: files in, one summarize job per file out.

The body is multipart/form-data. Every part with a filename is a document (.txt, .md, .html,
.pdf); the other parts are options applied to every job: `instructions`, `style`,
`target_words`, `context_window`, `model`, `max_attempts`, `deadline_s`, and `params` (a JSON
object). All files are read and checked before any job is created, so a bad file creates
nothing. The jobs belong to the API key of the request, like those of `POST /api/jobs`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from aiohttp import BodyPartReader, MultipartReader, web
from pydantic import BaseModel, ValidationError

from api import openapi
from api.auth import principal
from api.errors import MalformedBody
from api.jobs import json_response
from api.state import SERVICE
from promptq.documents import Document, check_size, read_document
from promptq.errors import DocumentTooLarge, InvalidRequest
from promptq.schemas import JobOut, SummarizeJobCreate
from promptq.service import check_storable, describe_validation_error

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()

#: Form fields copied into every job of an upload, and how each is parsed.
OPTION_FIELDS = {
    "instructions": str,
    "style": str,
    "target_words": int,
    "context_window": int,
    "model": str,
    "max_attempts": int,
    "deadline_s": float,
    "params": "json",
}
#: Most files one upload may carry.
MAX_FILES = 100
#: Longest accepted value of an option field.
MAX_OPTION_BYTES = 64 * 1024
_READ_BYTES = 256 * 1024


class UploadOut(BaseModel):
    """The jobs an upload created, one per file, in file order."""

    jobs: list[JobOut]


#: The multipart form, for the OpenAPI spec.
UPLOAD_FORM = openapi.Content(
    "multipart/form-data",
    {
        "type": "object",
        "properties": {
            "file": {
                "type": "array",
                "items": {"type": "string", "contentMediaType": "application/octet-stream"},
                "description": "the documents (.txt, .md, .html, .pdf), one part each",
            },
            "instructions": {"type": "string"},
            "style": {"type": "string", "enum": ["bullets", "paragraph"]},
            "target_words": {"type": "integer"},
            "context_window": {"type": "integer"},
            "model": {"type": "string"},
            "max_attempts": {"type": "integer"},
            "deadline_s": {"type": "number"},
            "params": {"type": "string", "description": "sampling parameters as a JSON object"},
        },
        "required": ["file"],
    },
)


@routes.post("/api/jobs/summarize/upload")
@openapi.operation(request=UPLOAD_FORM, responses={202: UploadOut}, tags=("jobs",))
async def upload_documents(request: web.Request) -> web.Response:
    """Create one summarize job per uploaded file; 202 with `{"jobs": [...]}` in file order."""
    service = request.app[SERVICE]
    settings = service.settings
    if request.content_type != "multipart/form-data":
        raise InvalidRequest(
            "send the documents as multipart/form-data, one file part each "
            "(curl -F file=@report.pdf ...)"
        )
    if request.content_length is not None and request.content_length > settings.max_upload_bytes:
        raise _upload_too_large(request.content_length, settings.max_upload_bytes)
    files, options = await _read_parts(
        request, settings.max_document_bytes, settings.max_upload_bytes
    )
    if not files:
        raise InvalidRequest("the upload contains no files; send at least one file part")
    documents = [
        await asyncio.to_thread(
            read_document,
            name,
            data,
            max_bytes=settings.max_document_bytes,
            content_type=content_type,
        )
        for name, content_type, data in files
    ]
    specs = [_job_request(document, options) for document in documents]
    submitted = await service.submit_all(list(specs), owner_key_id=principal(request).key_id)
    jobs = await service.describe([job for job, _ in submitted])
    return json_response(UploadOut(jobs=jobs), status=202)


async def open_multipart(request: web.Request) -> MultipartReader:
    """The multipart reader of a request, a FormReader: a malformed body is a 4xx, not a 500.

    InvalidRequest when the Content-Type has no (valid) boundary.
    """
    try:
        return FormReader(  # what request.multipart() passes
            request.headers,
            request.content,
            client_max_size=request.client_max_size,
            max_field_size=request.protocol.max_field_size,
            max_headers=request.protocol.max_headers,
            max_size_error_cls=web.HTTPRequestEntityTooLarge,
        )
    except ValueError:  # no boundary, or not multipart after all
        raise InvalidRequest(
            "the multipart/form-data body has no boundary; let your HTTP client build it "
            "(curl -F file=@report.pdf ...)"
        ) from None


class FormPart(BodyPartReader):
    """A body part of a FormReader: reading a malformed part raises MalformedBody."""

    async def read_chunk(self, size: int = BodyPartReader.chunk_size) -> bytes:
        """Up to `size` bytes of the part (every other read of a part goes through this)."""
        with _malformed_form():
            return await super().read_chunk(size)

    async def read(self, *, decode: bool = False) -> bytes:
        """The whole part; with `decode`, after its Content-Transfer-Encoding (e.g. base64)."""
        with _malformed_form():
            return await super().read(decode=decode)


class FormReader(MultipartReader):
    """aiohttp's multipart reader, raising MalformedBody (400) where it raises ValueError or
    RuntimeError because the body breaks the multipart syntax: no starting boundary, a part
    cut short or without its closing boundary, an unknown or broken transfer encoding.

    Only errors of these reads are translated; the ConnectionResetError of a client that hangs
    up and the RequestPayloadError of an undecodable body pass through to the error middleware.
    """

    part_reader_cls = FormPart

    async def next(self) -> MultipartReader | BodyPartReader | None:
        """The next part, or None after the closing boundary."""
        with _malformed_form():
            return await super().next()


@contextmanager
def _malformed_form() -> Iterator[None]:
    """Raise MalformedBody for the ValueError/RuntimeError of a malformed multipart body."""
    try:
        yield
    except (ValueError, RuntimeError) as exc:
        raise MalformedBody(
            f"the multipart/form-data body is malformed or incomplete ({str(exc)[:200]}); "
            "let your HTTP client build it (curl -F file=@report.pdf ...)"
        ) from exc


async def _read_parts(
    request: web.Request, max_document_bytes: int, max_upload_bytes: int
) -> tuple[list[tuple[str, str | None, bytes]], dict[str, Any]]:
    """(filename, content type, bytes) of each file part, and the option fields."""
    reader = await open_multipart(request)
    files: list[tuple[str, str | None, bytes]] = []
    options: dict[str, Any] = {}
    total_bytes = 0
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise InvalidRequest("nested multipart bodies are not supported")
        if part.filename is not None:
            if len(files) >= MAX_FILES:
                raise InvalidRequest(f"an upload may carry at most {MAX_FILES} files")
            name = part.filename.replace("\\", "/").rsplit("/", 1)[-1] or "document"
            data = await _read_limited(
                part, name, max_document_bytes, max_upload_bytes - total_bytes
            )
            total_bytes += len(data)
            files.append((name, part.headers.get("Content-Type"), data))
        elif part.name in OPTION_FIELDS:
            raw = await part.read()
            if len(raw) > MAX_OPTION_BYTES:
                raise InvalidRequest(
                    f"the {part.name} field is longer than {MAX_OPTION_BYTES} bytes"
                )
            options[part.name] = _option(part.name, raw.decode("utf-8", errors="replace"))
        else:
            raise InvalidRequest(
                f"unknown form field {str(part.name)[:64]!r}; send files and any of "
                f"{', '.join(OPTION_FIELDS)}"
            )
    return files, options


async def _read_limited(part: BodyPartReader, name: str, max_bytes: int, left_bytes: int) -> bytes:
    """A file part's bytes, stopping with 413 as soon as it is over either limit."""
    data = bytearray()
    while chunk := await part.read_chunk(_READ_BYTES):
        data.extend(chunk)
        check_size(name, len(data), max_bytes)
        if len(data) > left_bytes:
            raise _upload_too_large(None, None)
    return bytes(data)


def _upload_too_large(size_bytes: int | None, max_bytes: int | None) -> DocumentTooLarge:
    detail = f" ({size_bytes} bytes; the limit is {max_bytes})" if size_bytes else ""
    return DocumentTooLarge(f"the upload is too large{detail}: PROMPTQ_MAX_UPLOAD_BYTES")


def _option(name: str, value: str) -> Any:
    kind = OPTION_FIELDS[name]
    if kind is int:
        try:
            return int(value.strip())
        except ValueError:
            raise InvalidRequest(f"{name} must be an integer; got {value[:64]!r}") from None
    if kind is float:
        try:
            return float(value.strip())
        except ValueError:
            raise InvalidRequest(f"{name} must be a number; got {value[:64]!r}") from None
    if kind == "json":
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            raise InvalidRequest(f"{name} must be a JSON object; got {value[:64]!r}") from None
    return value


def _job_request(document: Document, options: dict[str, Any]) -> SummarizeJobCreate:
    body = {
        "kind": "summarize",
        "document": document.text,
        "filename": document.filename,
        **({"format": "markdown"} if document.format == "markdown" else {}),
        **options,
    }
    check_storable(body)  # the options may carry NUL or deep nesting (the text has no NUL)
    try:
        return SummarizeJobCreate.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None
