"""`/v1/files`: the OpenAI Files API (upload a batch input file; read, list, delete files).

Files belong to the API key that uploaded them (output files: to the batch's owner); other
keys get 404, admin keys see every file.
"""

from __future__ import annotations

from aiohttp import BodyPartReader, web

from api import openai_openapi as spec
from api.auth import principal
from api.jobs import json_response
from api.openai_pages import page_params
from api.state import SERVICE
from api.uploads import open_multipart
from promptq.errors import DocumentTooLarge, InvalidRequest
from promptq.files import UPLOAD_PURPOSES, FileStore, file_object
from promptq.openai_schemas import BadRequest

routes = web.RouteTableDef()

_READ_BYTES = 256 * 1024


def _files(request: web.Request) -> FileStore:
    return FileStore(request.app[SERVICE].store.sessionmaker)


@routes.post("/v1/files")
@spec.create_file
async def create_file(request: web.Request) -> web.Response:
    """Upload a file (multipart: `file` and `purpose`); the `file` object."""
    if request.content_type != "multipart/form-data":
        raise BadRequest("upload the file as multipart/form-data with `file` and `purpose` parts")
    max_bytes = request.app[SERVICE].settings.api_max_body_bytes
    reader = await open_multipart(request)
    purpose: str | None = None
    upload: tuple[str, bytes] | None = None
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise BadRequest("nested multipart bodies are not supported")
        if part.name == "purpose":
            purpose = (await part.read(decode=True)).decode("utf-8", errors="replace").strip()
        elif part.name == "file":
            data = bytearray()
            while chunk := await part.read_chunk(_READ_BYTES):
                data.extend(chunk)
                if len(data) > max_bytes:
                    raise DocumentTooLarge(
                        f"the file is larger than {max_bytes} bytes (PROMPTQ_API_MAX_BODY_BYTES)"
                    )
            name = (part.filename or "file").replace("\\", "/").rsplit("/", 1)[-1]
            upload = (name, bytes(data))
        else:
            await part.release()
    if upload is None:
        raise BadRequest("the upload has no `file` part")
    if purpose not in UPLOAD_PURPOSES:
        raise BadRequest(
            f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}; got {str(purpose)[:64]!r}"
        )
    row = await _files(request).create(
        owner_key_id=principal(request).key_id,
        purpose=purpose,
        filename=upload[0],
        content=upload[1],
    )
    return json_response(file_object(row))


@routes.get("/v1/files")
@spec.list_files
async def list_files(request: web.Request) -> web.Response:
    """The caller's files, newest first (`order=asc` for oldest first), paged by `after`."""
    after, limit = page_params(request, prefix="file-")
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest(f"order must be asc or desc; got {order[:16]!r}")
    rows = await _files(request).list(
        owned_by=principal(request).owner_filter,
        purpose=request.query.get("purpose") or None,
        after=after,
        limit=limit + 1,
        newest_first=order == "desc",
    )
    page = rows[:limit]
    return json_response(
        {
            "object": "list",
            "data": [file_object(row) for row in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(rows) > limit,
        }
    )


@routes.get("/v1/files/{id}")
@spec.retrieve_file
async def retrieve_file(request: web.Request) -> web.Response:
    """One file's `file` object."""
    row = await _files(request).get(
        request.match_info["id"], owned_by=principal(request).owner_filter
    )
    return json_response(file_object(row))


@routes.get("/v1/files/{id}/content")
@spec.file_content
async def file_content(request: web.Request) -> web.Response:
    """One file's bytes."""
    row = await _files(request).get(
        request.match_info["id"], owned_by=principal(request).owner_filter, content=True
    )
    content_type = "application/jsonl" if row.filename.endswith(".jsonl") else "text/plain"
    return web.Response(body=row.content, content_type=content_type)


@routes.delete("/v1/files/{id}")
@spec.delete_file
async def delete_file(request: web.Request) -> web.Response:
    """Delete a file."""
    file_id = request.match_info["id"]
    await _files(request).delete(file_id, owned_by=principal(request).owner_filter)
    return json_response({"id": file_id, "object": "file", "deleted": True})
