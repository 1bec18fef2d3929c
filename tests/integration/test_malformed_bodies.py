"""Request bodies that cannot be read: broken multipart syntax, a false Content-Encoding, a
client that hangs up mid-body.

Given the real API over a real database and Redis, when a body cannot be read, then the answer
is a 400 `bad_request` in the route's error shape (OpenAI's under /v1) that says what to fix,
nothing is logged as a warning or an error (it is neither a crash nor an outage), and nothing
is created.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import func, select

from api.app import create_app
from promptq.logs import MalformedRequestFilter
from promptq.models import Batch, File, Job
from promptq.service import JobService
from promptq.settings import Settings
from tests.conftest import ApiStarter, KeyFactory, bearer, wait_for

Client = TestClient[web.Request, web.Application]

UPLOAD = "/api/jobs/summarize/upload"
MULTIPART_ROUTES = [UPLOAD, "/api/batches", "/v1/files"]
MULTIPART = {"Content-Type": "multipart/form-data; boundary=XX"}
#: A file part whose body ends before its closing boundary.
UNCLOSED_PART = b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\nab'
#: A purpose part in a transfer encoding nobody knows (read decoded by /v1/files).
UNKNOWN_ENCODING = (
    b'--XX\r\nContent-Disposition: form-data; name="purpose"\r\n'
    b"Content-Transfer-Encoding: x-rot13\r\n\r\nbatch\r\n--XX--\r\n"
)
GZIP_LIE = {"Content-Encoding": "gzip"}


@pytest.fixture
async def key(make_key: KeyFactory) -> str:
    """An admin key: it may use every route these tests send to."""
    return await make_key("malformed-bodies", admin=True)


@pytest.fixture
async def api(start_api: ApiStarter, key: str) -> Client:
    """The real API app, sending `key`."""
    return await start_api(bearer(key))


async def stored(service: JobService) -> tuple[int, int, int, int]:
    """(jobs, batches, files) rows in the database, and jobs in the Redis queue."""
    async with service.store.sessionmaker() as session:
        counts = [
            (await session.execute(select(func.count()).select_from(model))).scalar_one()
            for model in (Job, Batch, File)
        ]
    queued = await service.queue.redis.zcard(service.queue.queue_name)
    return counts[0], counts[1], counts[2], queued


def loud_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What was logged at WARNING or above."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def post(api: Client, path: str, body: bytes, headers: dict[str, str]) -> str:
    """POST a raw body; assert the 400 `bad_request` in the route's error shape; its message."""
    async with api.post(path, data=body, headers=headers) as response:
        status, payload = response.status, await response.json()
    assert status == 400, (path, payload)
    error = payload["error"]
    if path.startswith("/v1/"):  # OpenAI's shape: the SDKs raise BadRequestError
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["type"] == "invalid_request_error" and error["param"] is None, error
    else:
        assert set(error) == {"code", "message"}, error
    assert error["code"] == "bad_request", (path, error)
    message: str = error["message"]
    return message


@pytest.mark.parametrize("path", MULTIPART_ROUTES)
@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"junk", "Could not find starting boundary"),  # no boundary line at all
        (b"", "Could not find starting boundary"),
        (UNCLOSED_PART, "Reading after EOF"),  # no closing boundary
    ],
    ids=["junk", "empty", "unclosed"],
)
async def test_a_broken_multipart_body_is_a_400_that_creates_nothing(
    api: Client,
    service: JobService,
    caplog: pytest.LogCaptureFixture,
    path: str,
    body: bytes,
    says: str,
) -> None:
    # When a multipart/form-data body breaks the multipart syntax
    message = await post(api, path, body, MULTIPART)

    # Then the 400 says so and how to fix it; nothing is logged loudly or created
    assert says in message and "multipart/form-data" in message and "curl -F" in message
    assert not loud_records(caplog)
    assert await stored(service) == (0, 0, 0, 0)


async def test_an_unknown_transfer_encoding_of_a_file_field_is_a_400(
    api: Client, service: JobService, caplog: pytest.LogCaptureFixture
) -> None:
    # When /v1/files gets its purpose in a Content-Transfer-Encoding nobody knows
    message = await post(api, "/v1/files", UNKNOWN_ENCODING, MULTIPART)

    # Then it is a malformed form, not a crash
    assert "unknown content transfer encoding: x-rot13" in message
    assert not loud_records(caplog)
    assert await stored(service) == (0, 0, 0, 0)


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/api/jobs", "application/json"),
        ("/api/batches", "application/x-ndjson"),
        (UPLOAD, MULTIPART["Content-Type"]),
        ("/v1/files", MULTIPART["Content-Type"]),
    ],
)
async def test_a_body_that_is_not_what_its_content_encoding_says_is_a_400(
    api: Client,
    service: JobService,
    caplog: pytest.LogCaptureFixture,
    path: str,
    content_type: str,
) -> None:
    # When a body says `Content-Encoding: gzip` but is not gzip
    headers = {"Content-Type": content_type, **GZIP_LIE}
    message = await post(api, path, b"notgzip", headers)

    # Then the 400 names the encoding; nothing is logged loudly or created
    assert "Can not decode content-encoding: gzip" in message and "Content-Encoding" in message
    assert not loud_records(caplog)
    assert await stored(service) == (0, 0, 0, 0)


@pytest.fixture
async def served(settings: Settings) -> AsyncIterator[web.AppRunner]:
    """The API served as `promptq api` serves it (a handler is not cancelled when its client
    hangs up, so it meets the closed connection while reading the body)."""
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner
    await runner.cleanup()


@pytest.mark.parametrize(
    ("path", "content_type", "part"),
    [
        (UPLOAD, MULTIPART["Content-Type"], UNCLOSED_PART),
        ("/api/batches", MULTIPART["Content-Type"], UNCLOSED_PART),
        ("/api/jobs", "application/json", b'{"kind": "prompt", "messages": ['),
    ],
    ids=["upload", "batch-form", "job"],
)
async def test_a_client_hanging_up_mid_body_is_not_a_database_outage(
    served: web.AppRunner,
    key: str,
    service: JobService,
    caplog: pytest.LogCaptureFixture,
    path: str,
    content_type: str,
    part: bytes,
) -> None:
    caplog.set_level(logging.INFO, logger="api.errors")

    # When a client sends part of the body it announced, then closes the connection
    _, writer = await asyncio.open_connection("127.0.0.1", served.addresses[0][1])
    head = (
        f"POST {path} HTTP/1.1\r\nHost: promptq\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: 20000\r\n\r\n"
    )
    writer.write(head.encode() + part)
    await writer.drain()

    async def reading() -> bool:  # the handler has started, and waits for the rest of the body
        return served.server is not None and served.server.requests_count > 0

    await wait_for(reading)
    writer.close()
    await writer.wait_closed()

    # Then the API notes the hang-up at INFO; no "backing service unavailable", nothing created
    async def noted() -> bool:
        return bool(loud_records(caplog)) or any(
            "closed the connection" in r.getMessage() for r in caplog.records
        )

    await wait_for(noted)
    assert not loud_records(caplog)
    assert await stored(service) == (0, 0, 0, 0)


async def test_a_request_aiohttp_cannot_parse_is_logged_as_one_info_line(
    served: web.AppRunner, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the API with promptq's logging filter on aiohttp's server log
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(logging.getLogger("aiohttp.server"), "filters", [MalformedRequestFilter()])

    # When a request line is longer than aiohttp reads (8190 bytes)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.addresses[0][1])
    writer.write(f"GET /api/jobs?model={'x' * 20_000} HTTP/1.1\r\nHost: promptq\r\n\r\n".encode())
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    await writer.wait_closed()

    # Then the client gets its 400, and the log one INFO line without a traceback
    assert status_line.split()[1] == b"400", status_line

    async def noted() -> bool:
        return any("refused a malformed HTTP request" in r.getMessage() for r in caplog.records)

    await wait_for(noted)
    assert not loud_records(caplog)
    assert not any(r.exc_info for r in caplog.records if r.name == "aiohttp.server")
