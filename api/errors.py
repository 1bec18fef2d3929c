"""One middleware maps every error to `{"error": {"code", "message"}}`; never a traceback."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel
from redis.exceptions import RedisError

from promptq.db import is_db_unavailable
from promptq.errors import PromptQError, ServiceUnavailable

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Seconds a client should wait before retrying after a 503.
RETRY_AFTER_S = 2
#: Headers describing an HTTPException's own body, which the JSON error body replaces.
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The one error body shape."""
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn PromptQError, HTTP errors and unexpected crashes into JSON error responses."""
    try:
        return await handler(request)
    except ServiceUnavailable as exc:
        return error_response(
            exc.http_status, exc.code, exc.message, {"Retry-After": str(RETRY_AFTER_S)}
        )
    except PromptQError as exc:
        return error_response(exc.http_status, exc.code, exc.message)
    except HttpProcessingError as exc:  # a malformed part of the body (e.g. multipart headers)
        return error_response(
            400, "bad_request", f"the request is malformed: {exc.message or 'bad syntax'}"[:300]
        )
    except web.HTTPRequestEntityTooLarge as exc:  # its text names the limit and the size
        return error_response(
            413,
            "request_entity_too_large",
            f"{exc.text}; send less, or raise PROMPTQ_API_MAX_BODY_BYTES",
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_").replace("-", "_")
        # Keep headers such as Allow, but not the exception's own text/plain body headers:
        # json_response refuses a Content-Type header next to its content_type.
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
        return error_response(exc.status, code, exc.text or exc.reason, headers)
    except Exception as exc:
        if isinstance(exc, RedisError) or is_db_unavailable(exc):
            logger.warning(
                "backing service unavailable for %s %s: %r", request.method, request.path, exc
            )
            return error_response(
                503,
                ServiceUnavailable.code,
                "a backing service (database or Redis) is unavailable; retry shortly",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error; see the server log")


class ErrorDetail(BaseModel):
    """What went wrong: a stable machine-readable code and a message for people."""

    code: str
    message: str


class ErrorOut(BaseModel):
    """The body of every error response."""

    error: ErrorDetail
