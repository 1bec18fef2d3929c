"""The /v1 routes in the OpenAPI spec: OpenAI's object shapes and error body, as schemas.

The handlers build OpenAI's objects as plain dicts (promptq.openai_format, files, openai_batch);
these schemas state the fields every client relies on, and allow the rest.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from api import openapi
from promptq.openai_schemas import ChatCompletionRequest


class OpenAIErrorDetail(BaseModel):
    """OpenAI's error fields."""

    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorOut(BaseModel):
    """The body of every error under /v1, as the OpenAI SDKs expect it."""

    error: OpenAIErrorDetail


class PageQuery(BaseModel):
    """OpenAI's list pagination."""

    limit: int = Field(default=20, ge=1, le=100, description="most objects to return")
    after: str | None = Field(default=None, description="the last id of the previous page")


class FileListQuery(PageQuery):
    """`GET /v1/files` filters."""

    purpose: str | None = Field(default=None, description="only files with this purpose")
    order: str = Field(default="desc", description="`asc` or `desc` by creation time")


def _object(kind: str, *required: str, **properties: Any) -> openapi.Content:
    schema = {
        "type": "object",
        "required": ["id", "object", *required],
        "properties": {"id": {"type": "string"}, "object": {"const": kind}, **properties},
    }
    return openapi.Content("application/json", schema)


def _list(item: openapi.Content) -> openapi.Content:
    schema = {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": item.schema},
        },
    }
    return openapi.Content("application/json", schema)


MODEL = _object("model")
FILE = _object("file", "bytes", "filename", "purpose", bytes={"type": "integer"})
FILE_DELETED = _object("file", "deleted", deleted={"type": "boolean"})
BATCH = _object("batch", "status", "input_file_id", status={"type": "string"})
CHAT_COMPLETION = _object("chat.completion", "choices", "model", choices={"type": "array"})
#: A streamed chat completion: `data:` events of chat.completion.chunk objects, then [DONE].
CHAT_CHUNKS = openapi.Content(
    "text/event-stream",
    {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}},
)
FILE_UPLOAD = openapi.Content(
    "multipart/form-data",
    {
        "type": "object",
        "required": ["file", "purpose"],
        "properties": {
            "file": {"type": "string", "contentMediaType": "application/octet-stream"},
            "purpose": {"type": "string", "enum": ["batch", "user_data"]},
        },
    },
)
BATCH_CREATE = openapi.Content(
    "application/json",
    {
        "type": "object",
        "required": ["input_file_id", "endpoint", "completion_window"],
        "properties": {
            "input_file_id": {"type": "string"},
            "endpoint": {"type": "string", "enum": ["/v1/chat/completions"]},
            "completion_window": {"type": "string", "enum": ["24h"]},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
)
E = OpenAIErrorOut
V1 = ("openai",)
ID = {"id": "the object's id"}

chat_completions = openapi.operation(
    request=ChatCompletionRequest,
    responses={
        200: (CHAT_COMPLETION, CHAT_CHUNKS),
        404: E,
        409: E,
        429: E,
        502: E,
        504: E,
    },
    error=E,
    tags=V1,
)
list_models = openapi.operation(responses={200: _list(MODEL)}, error=E, tags=V1)
retrieve_model = openapi.operation(
    responses={200: MODEL, 404: E}, path_params={"id": "the model's name"}, error=E, tags=V1
)
create_file = openapi.operation(request=FILE_UPLOAD, responses={200: FILE}, error=E, tags=V1)
list_files = openapi.operation(
    query=FileListQuery, responses={200: _list(FILE), 400: E}, error=E, tags=V1
)
retrieve_file = openapi.operation(responses={200: FILE, 404: E}, path_params=ID, error=E, tags=V1)
file_content = openapi.operation(
    responses={200: (openapi.Content("application/jsonl"), openapi.Content("text/plain")), 404: E},
    path_params=ID,
    error=E,
    tags=V1,
)
delete_file = openapi.operation(
    responses={200: FILE_DELETED, 404: E, 409: E}, path_params=ID, error=E, tags=V1
)
create_batch = openapi.operation(
    request=BATCH_CREATE, responses={200: BATCH, 404: E}, error=E, tags=V1
)
list_batches = openapi.operation(
    query=PageQuery, responses={200: _list(BATCH), 400: E}, error=E, tags=V1
)
retrieve_batch = openapi.operation(responses={200: BATCH, 404: E}, path_params=ID, error=E, tags=V1)
cancel_batch = openapi.operation(
    responses={200: BATCH, 404: E, 409: E}, path_params=ID, error=E, tags=V1
)
