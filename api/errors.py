"""One middleware maps every error to `{"error": {"code", "message"}}`; never a traceback."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from pydantic import BaseModel
from redis.exceptions import RedisError

from promptq.db import is_db_unavailable
from promptq.errors import InvalidRequest, PromptQError, ServiceUnavailable

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Seconds a client should wait before retrying after a 503.
RETRY_AFTER_S = 2
#: Headers describing an HTTPException's own body, which the JSON error body replaces.
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})


class MalformedBody(InvalidRequest):
    """The request body cannot be read: broken multipart syntax, a Content-Encoding it does not
    have, or cut short."""

    code = "bad_request"
    http_status = 400


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
            f"{(exc.text or '').rstrip('.')}; send less, or raise PROMPTQ_API_MAX_BODY_BYTES",
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
        if exc is request.content.exception():  # reading the body failed: the client's doing
            return _unreadable_body(request, exc)
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


def _unreadable_body(request: web.Request, exc: BaseException) -> web.Response:
    """The 400 for a request body whose stream aiohttp failed with `exc`.

    Either the client hung up mid-body (a ConnectionResetError; logged at INFO, as nobody is
    left to read the answer) or aiohttp could not decode the body (a RequestPayloadError, e.g.
    `Content-Encoding: gzip` on bytes that are not gzip). Neither is the server's fault, nor a
    database or Redis outage.
    """
    if request.transport is None:
        logger.info(
            "the client closed the connection while sending %s %s: %r",
            request.method,
            request.path,
            exc,
        )
        return error_response(
            MalformedBody.http_status,
            MalformedBody.code,
            "the connection closed before the request body was complete; send the request again",
        )
    cause = exc.__cause__
    detail = cause.message if isinstance(cause, HttpProcessingError) else str(exc)
    error = MalformedBody(
        f"the request body cannot be read ({detail[:200]}); send it complete and encoded as "
        "its Content-Encoding header says (or without that header)"
    )
    return _ClosingResponse(request.protocol, error)


class _ClosingResponse(web.Response):
    """An error response after which the connection closes, the rest of the body unread.

    For a body aiohttp failed to decode: the rest of it cannot be read, and aiohttp's own
    read of an unread body after the response ("lingering") would meet the same error and log
    it as "Unhandled exception" with a traceback.
    """

    def __init__(self, protocol: RequestHandler, error: PromptQError) -> None:
        super().__init__(
            body=orjson.dumps({"error": {"code": error.code, "message": error.message}}),
            status=error.http_status,
            content_type="application/json",
        )
        self._protocol = protocol
        self.force_close()  # Connection: close

    async def write_eof(self, data: bytes = b"") -> None:
        """Finish the response, then close the connection."""
        await super().write_eof(data)
        self._protocol.force_close()


class ErrorDetail(BaseModel):
    """What went wrong: a stable machine-readable code and a message for people."""

    code: str
    message: str


class ErrorOut(BaseModel):
    """The body of every error response."""

    error: ErrorDetail
