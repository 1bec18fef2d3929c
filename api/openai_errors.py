"""Errors under /v1 in OpenAI's shape, so the OpenAI SDKs raise their usual exceptions.

promptq's own error body is `{"error": {"code", "message"}}`. Under /v1 the outermost
middleware rewrites every error response (from the error middleware, the auth middleware or a
handler) to OpenAI's `{"error": {"message", "type", "param", "code"}}`, keeping its status:
400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 422 UnprocessableEntityError,
429 RateLimitError, 5xx InternalServerError.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from api.errors import Handler

#: The prefix of the OpenAI-compatible routes.
OPENAI_PREFIX = "/v1/"
#: The header the OpenAI SDKs obey before retrying on their own: "false" says don't.
SHOULD_RETRY = "x-should-retry"

#: OpenAI's error `type` by HTTP status (others: by class, below).
_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}
#: The request field an error code is about.
_PARAMS = {"model_not_found": "model", "invalid_json": None}


def error_type(status: int) -> str:
    """OpenAI's error type for an HTTP status."""
    if status in _TYPES:
        return _TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def openai_error(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error response in OpenAI's shape."""
    body = {"error": _error(status, message, code=code, param=param)}
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def _error(status: int, message: str, *, code: str | None, param: str | None) -> dict[str, Any]:
    return {
        "message": message,
        "type": error_type(status),
        "param": param if param is not None else _PARAMS.get(code or ""),
        "code": code,
    }


@web.middleware
async def openai_error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Under /v1, give promptq's error responses OpenAI's body shape."""
    response = await handler(request)
    if (
        not request.path.startswith(OPENAI_PREFIX)
        or response.status < 400
        or not isinstance(response, web.Response)
        or response.content_type != "application/json"
        or not isinstance(response.body, bytes)
    ):
        return response
    try:
        error = orjson.loads(response.body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return response
    if not isinstance(error, dict) or "type" in error:
        return response  # not ours, or already OpenAI's
    code = error.get("code")
    body = {
        "error": _error(
            response.status,
            str(error.get("message", "")),
            code=code if isinstance(code, str) else None,
            param=None,
        )
    }
    response.body = orjson.dumps(body)
    return response
