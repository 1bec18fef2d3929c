"""Routes under /api/batches: submit many jobs at once, follow them, export their results.

`POST /api/batches` takes either a JSON body `{"jobs": [...], "name"?, "models"?}` (bounded by
PROMPTQ_API_MAX_BODY_BYTES) or a JSONL upload of any size up to PROMPTQ_BATCH_MAX_BYTES:
`Content-Type: application/x-ndjson` (or application/jsonl), or a multipart form with one file
part. A JSONL body is streamed to a temporary file, validated line by line in a worker thread,
and only then inserted, so an invalid upload creates nothing and memory stays flat.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import IO, Literal

from aiohttp import BodyPartReader, web
from pydantic import BaseModel, Field

from api import openapi
from api.auth import principal
from api.errors import ErrorOut
from api.jobs import json_response, read_json
from api.params import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    cursor_param,
    index_cursor_param,
    page_limit,
    path_id,
    split_page,
)
from api.state import SERVICE
from api.uploads import open_multipart
from promptq import batch_export
from promptq.batch_items import (
    Validation,
    check_metadata,
    check_models,
    check_name,
    read_spool,
    validate_jsonl,
    validate_list,
)
from promptq.batch_schemas import BatchCreatedOut, BatchOut, BatchPage, ComparePage
from promptq.batches import BatchCreated, BatchService
from promptq.errors import BatchTooLarge, InvalidBatch, InvalidRequest

logger = logging.getLogger(__name__)

routes = web.RouteTableDef()

JSONL_TYPES = frozenset(
    {"application/x-ndjson", "application/jsonl", "application/jsonlines", "application/x-jsonl"}
)
#: Bytes read from the request per chunk while spooling an upload.
READ_BYTES = 256 * 1024
#: Longest form field (name, models) of a multipart upload.
MAX_FIELD_BYTES = 4096
#: Result records sent per write of the results stream.
WRITE_RECORDS = 200
#: Temporary files keep up to this much in memory before they go to disk.
SPOOL_MEMORY_BYTES = 4 * 1024 * 1024


#: The three ways to send a batch, for the OpenAPI spec (the handler validates each item).
BATCH_BODIES = (
    openapi.Content(
        "application/json",
        {
            "type": "object",
            "required": ["jobs"],
            "properties": {
                "jobs": {"type": "array", "items": {"type": "object"}, "minItems": 1},
                "name": {"type": "string"},
                "models": {"type": "array", "items": {"type": "string"}},
                "metadata": {"type": "object"},
            },
        },
    ),
    openapi.Content("application/x-ndjson", {"type": "string"}),
    openapi.Content(
        "multipart/form-data",
        {
            "type": "object",
            "required": ["file"],
            "properties": {
                "file": {"type": "string", "contentMediaType": "application/x-ndjson"},
                "name": {"type": "string"},
                "models": {"type": "string"},
            },
        },
    ),
)
BATCH_ID = {"id": "the batch's id (a UUID)"}


class BatchCreateQuery(BaseModel):
    """The query parameters of `POST /api/batches` with a JSONL body (the JSON body and the
    multipart form carry these as fields instead)."""

    name: str | None = Field(default=None, description="the batch's name")
    models: str | None = Field(
        default=None, description="run every item on each of these models (comma-separated)"
    )
    model: str | None = Field(default=None, description="one of the models (may be repeated)")


class BatchListQuery(BaseModel):
    """The query parameters of `GET /api/batches` (documentation; parsed by the handler)."""

    limit: int = Field(
        default=DEFAULT_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE, description="most batches to return"
    )
    cursor: str | None = Field(default=None, description="`next_cursor` of the previous page")


class ResultsQuery(BaseModel):
    """The query parameters of `GET /api/batches/{id}/results`."""

    format: Literal["jsonl", "csv"] = Field(default="jsonl", description="JSONL or CSV")


class CompareQuery(BaseModel):
    """The query parameters of `GET /api/batches/{id}/compare`."""

    limit: int = Field(
        default=DEFAULT_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE, description="most items to return"
    )
    cursor: str | None = Field(default=None, description="`next_cursor` of the previous page")


@routes.post("/api/batches")
@openapi.operation(
    request=BATCH_BODIES,
    query=BatchCreateQuery,
    responses={201: BatchCreatedOut, 200: BatchCreatedOut},
    headers={
        201: {"Location": "the batch's URL"},
        200: {"Location": "the batch's URL", "Idempotent-Replayed": "true"},
    },
    tags=("batches",),
)
async def create_batch(request: web.Request) -> web.Response:
    """Create a batch; 201 with the batch, or 422 listing the invalid lines (nothing created).
    A batch sent again (every item reuses, by its idempotency_key, a job of one earlier
    batch made the same way) is 200 with that earlier batch."""
    batches = BatchService(request.app[SERVICE])
    owner = principal(request).key_id
    try:
        if request.content_type == "application/json":
            _no_query_options(request, "fields of the JSON body")
            created = await _create_from_json(request, batches, owner)
        elif request.content_type in JSONL_TYPES:
            name, models = _query_options(request)
            created = await _create_from_stream(request, batches, owner, name, models)
        elif request.content_type == "multipart/form-data":
            _no_query_options(request, "form fields")
            created = await _create_from_multipart(request, batches, owner)
        else:
            raise InvalidRequest(
                'send {"jobs": [...]} as application/json, or one job per line as '
                "application/x-ndjson (or a multipart form with the .jsonl file)"
            )
    except InvalidBatch as exc:
        return _invalid_batch(exc)
    out = await batch_created_out(batches, created)
    headers = {"Location": f"/api/batches/{out.id}"}
    if created.replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(out, status=200 if created.replayed else 201, headers=headers)


async def batch_created_out(batches: BatchService, created: BatchCreated) -> BatchCreatedOut:
    """The response body of a created batch."""
    (out,) = await batches.describe([created.batch])
    return BatchCreatedOut(
        **out.model_dump(),
        created=created.created,
        reused=created.reused,
        cached=created.cached,
        following=created.following,
    )


def _invalid_batch(exc: InvalidBatch) -> web.Response:
    body = {"error": {"code": exc.code, "message": exc.message, "lines": exc.lines}}
    return json_response(body, status=exc.http_status)


async def _create_from_json(
    request: web.Request, batches: BatchService, owner: str | None
) -> BatchCreated:
    body = await read_json(request)
    if not isinstance(body, dict) or "jobs" not in body:
        raise InvalidRequest('the body must be {"jobs": [<job request>, ...], "name"?, "models"?}')
    unknown = set(body) - {"jobs", "name", "models", "metadata"}
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(sorted(unknown))[:200]}")
    name = check_name(body.get("name"))
    models = check_models(body.get("models"))
    metadata = check_metadata(body.get("metadata"))
    specs = validate_list(
        body["jobs"],
        batches.service.check,
        max_jobs=batches.settings.batch_max_items,
        models=models,
    )
    return await batches.create(
        specs, owner_key_id=owner, name=name, models=models, metadata=metadata
    )


def _no_query_options(request: web.Request, where: str) -> None:
    """Refuse the JSONL upload's query options on a body that carries its own."""
    if given := sorted(set(request.query) & set(BatchCreateQuery.model_fields)):
        raise InvalidRequest(
            f"query parameter(s) {', '.join(given)} apply to a JSONL body only; send them as "
            f"{where}"
        )


def _query_options(request: web.Request) -> tuple[str | None, list[str] | None]:
    query = request.query
    name = check_name(query.get("name"))
    return name, _models_param(query.getall("model", []) + query.getall("models", []))


def _models_param(values: Iterable[str]) -> list[str] | None:
    models = [m for value in values for m in value.split(",")]
    return check_models(models) if models else None


async def _create_from_stream(
    request: web.Request,
    batches: BatchService,
    owner: str | None,
    name: str | None,
    models: list[str] | None,
) -> BatchCreated:
    limit = batches.settings.batch_max_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_many_bytes(limit)
    with tempfile.SpooledTemporaryFile(SPOOL_MEMORY_BYTES) as upload:
        await _receive(upload, request.content.read, limit)
        return await _create_from_upload(upload, batches, owner, name, models)


async def _receive(
    upload: IO[bytes], read: Callable[[int], Awaitable[bytes]], limit_bytes: int
) -> None:
    """Copy the upload into `upload` (rewound), refusing more than `limit_bytes`."""
    size = 0
    while chunk := await read(READ_BYTES):
        size += len(chunk)
        if size > limit_bytes:
            raise _too_many_bytes(limit_bytes)
        upload.write(chunk)
    upload.seek(0)


async def _create_from_upload(
    upload: IO[bytes],
    batches: BatchService,
    owner: str | None,
    name: str | None,
    models: list[str] | None,
) -> BatchCreated:
    """Validate the received JSONL in a worker thread, then create the batch (or nothing)."""
    settings = batches.settings
    with tempfile.SpooledTemporaryFile(SPOOL_MEMORY_BYTES) as spool:
        started = time.perf_counter()
        report: Validation = await asyncio.to_thread(
            validate_jsonl,
            upload,
            spool,
            batches.service.check,
            max_jobs=settings.batch_max_items,
            models=models,
        )
        report.raise_if_invalid()
        logger.info(
            "batch upload: %d item(s) validated in %.2f s",
            report.items,
            time.perf_counter() - started,
        )
        return await batches.create(read_spool(spool), owner_key_id=owner, name=name, models=models)


async def _create_from_multipart(
    request: web.Request, batches: BatchService, owner: str | None
) -> BatchCreated:
    """Form fields `name` and `models` (or repeated `model`), and one file part, in any order."""
    reader = await open_multipart(request)
    name: str | None = None
    models: list[str] = []
    received = False
    with tempfile.SpooledTemporaryFile(SPOOL_MEMORY_BYTES) as upload:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise InvalidRequest("nested multipart bodies are not supported")
            if part.filename is not None:
                if received:
                    raise InvalidRequest("send one file per batch (one job per line)")
                await _receive(upload, part.read_chunk, batches.settings.batch_max_bytes)
                received = True
                continue
            if part.name not in {"name", "model", "models"}:
                raise InvalidRequest(
                    f"unknown form field {str(part.name)[:64]!r}; send name, models and one file"
                )
            value = (await _read_field(part)).decode("utf-8", errors="replace")
            if part.name == "name":
                name = check_name(value)
            else:
                models.extend(m for m in value.split(",") if m.strip())
        if not received:
            raise InvalidRequest(
                "the form has no file part; attach the .jsonl file (-F file=@jobs.jsonl)"
            )
        return await _create_from_upload(
            upload, batches, owner, name, check_models(models) if models else None
        )


async def _read_field(part: BodyPartReader) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(MAX_FIELD_BYTES):
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"the {part.name} field is longer than {MAX_FIELD_BYTES} bytes")
    return bytes(data)


def _too_many_bytes(limit: int) -> BatchTooLarge:
    return BatchTooLarge(
        f"the upload is larger than {limit} bytes (PROMPTQ_BATCH_MAX_BYTES); split it into "
        "several batches"
    )


@routes.get("/api/batches")
@openapi.operation(query=BatchListQuery, responses={200: BatchPage}, tags=("batches",))
async def list_batches(request: web.Request) -> web.Response:
    """Newest first, paginated by `limit` and `cursor`."""
    limit = page_limit(request.query.get("limit"))
    cursor = cursor_param(request.query.get("cursor"))
    batches = BatchService(request.app[SERVICE])
    rows = await batches.list_batches(
        limit=limit + 1, before_id=cursor, owned_by=principal(request).owner_filter
    )
    page, next_cursor = split_page(rows, limit)
    return json_response(BatchPage(batches=page, next_cursor=next_cursor))


@routes.get("/api/batches/{id}")
@openapi.operation(
    responses={200: BatchOut, 404: ErrorOut}, path_params=BATCH_ID, tags=("batches",)
)
async def get_batch(request: web.Request) -> web.Response:
    """One batch: counts per status, progress, usage."""
    batches = BatchService(request.app[SERVICE])
    batch_id = batch_id_param(request)
    return json_response(await batches.get(batch_id, owned_by=principal(request).owner_filter))


@routes.get("/api/batches/{id}/results")
@openapi.operation(
    query=ResultsQuery,
    responses={
        200: (openapi.Content("application/x-ndjson"), openapi.Content("text/csv")),
        404: ErrorOut,
    },
    path_params=BATCH_ID,
    tags=("batches",),
)
async def batch_results(request: web.Request) -> web.StreamResponse:
    """Every job's outcome in submission order, streamed as JSONL (default) or CSV."""
    batches = BatchService(request.app[SERVICE])
    batch_id = batch_id_param(request)
    fmt = batch_export.check_format(request.query.get("format"))
    await batches.get_row(batch_id, owned_by=principal(request).owner_filter)
    response = web.StreamResponse(
        headers={
            "Content-Type": batch_export.CONTENT_TYPES[fmt],
            "Content-Disposition": f'attachment; filename="batch-{batch_id}.{fmt}"',
        }
    )
    await response.prepare(request)
    buffer = [batch_export.header(fmt)]
    async for record in batches.results(batch_id):
        buffer.append(batch_export.encode(record, fmt))
        if len(buffer) >= WRITE_RECORDS:
            await response.write(b"".join(buffer))
            buffer.clear()
    await response.write(b"".join(buffer))
    await response.write_eof()
    return response


@routes.get("/api/batches/{id}/compare")
@openapi.operation(
    query=CompareQuery,
    responses={200: ComparePage, 404: ErrorOut},
    path_params=BATCH_ID,
    tags=("batches",),
)
async def compare_batch(request: web.Request) -> web.Response:
    """Each item with every model's answer, latency and tokens side by side (paginated), and
    per model a summary of the whole batch."""
    batches = BatchService(request.app[SERVICE])
    batch_id = batch_id_param(request)
    batch = await batches.get_row(batch_id, owned_by=principal(request).owner_filter)
    limit = page_limit(request.query.get("limit"))
    after_index = index_cursor_param(request.query.get("cursor"))
    page = await batches.compare_page(batch, after_index=after_index, limit=limit)
    return json_response(page)


def batch_id_param(request: web.Request) -> str:
    """The `{id}` of the route as a canonical id; NotFound when it cannot be one."""
    return path_id(request.match_info["id"], noun="batch")
