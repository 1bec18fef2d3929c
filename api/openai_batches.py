"""`/v1/batches`: the OpenAI Batch API (create from an uploaded file, retrieve, list, cancel).

Batches belong to the API key that created them; other keys get 404, admin keys see all.
Their jobs are ordinary promptq jobs: see promptq.openai_batch.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from api import openai_openapi as spec
from api.auth import principal
from api.jobs import json_response
from api.openai_chat import CATALOG, read_body
from api.openai_pages import page_params
from api.state import SERVICE
from promptq.openai_batch import OpenAIBatches, batch_object
from promptq.openai_schemas import BadRequest

routes = web.RouteTableDef()


def _batches(request: web.Request) -> OpenAIBatches:
    return OpenAIBatches(request.app[SERVICE], request.app[CATALOG])


@routes.post("/v1/batches")
@spec.create_batch
async def create_batch(request: web.Request) -> web.Response:
    """Make a batch from an uploaded input file; the `batch` object (`failed`, with `errors`,
    when a line of the file is bad)."""
    body = await read_body(request)
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    input_file_id = _string(body, "input_file_id")
    endpoint = _string(body, "endpoint")
    window = _string(body, "completion_window")
    metadata: Any = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise BadRequest("metadata must be an object of strings")
    caller = principal(request)
    batches = _batches(request)
    batch = await batches.create(
        input_file_id=input_file_id,
        endpoint=endpoint,
        completion_window=window,
        metadata=metadata,
        owner_key_id=caller.key_id,
        owned_by=caller.owner_filter,
    )
    return json_response(batch_object(batch, await batches.counts(batch.id)))


@routes.get("/v1/batches")
@spec.list_batches
async def list_batches(request: web.Request) -> web.Response:
    """The caller's batches, newest first, paged by `after` and `limit`."""
    after, limit = page_params(request)
    data, has_more = await _batches(request).list(
        after=after, limit=limit, owned_by=principal(request).owner_filter
    )
    return json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )


@routes.get("/v1/batches/{id}")
@spec.retrieve_batch
async def retrieve_batch(request: web.Request) -> web.Response:
    """One batch, with its request counts and (once finished) its output files."""
    batch = await _batches(request).retrieve(
        request.match_info["id"], owned_by=principal(request).owner_filter
    )
    return json_response(batch)


@routes.post("/v1/batches/{id}/cancel")
@spec.cancel_batch
async def cancel_batch(request: web.Request) -> web.Response:
    """Cancel a batch in progress: unfinished requests stop, finished ones keep their results."""
    batch = await _batches(request).cancel(
        request.match_info["id"], owned_by=principal(request).owner_filter
    )
    return json_response(batch)


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name} is required and must be a string")
    return value
