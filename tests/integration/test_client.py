"""The Python client (`promptq.client.PromptQClient`) against the real API on a real port.

Given the API app served in-process over real Redis and a real database (SQLite and PostgreSQL),
and an in-process worker talking to the fake LLM, when a program uses PromptQClient, then it can
submit, wait for, read and list jobs, and every API error arrives as the mapped exception.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from api import auth
from api.app import create_app
from promptq.client import PromptQClient
from promptq.errors import (
    DocumentTooLarge,
    IdempotencyConflict,
    InvalidRequest,
    NotFound,
    PromptQError,
    ServiceUnavailable,
    Unauthorized,
)
from promptq.keys import KeyStore
from promptq.service import JobService
from promptq.settings import Settings
from promptq.testing.fake_llm import FakeLLM, expected_reply
from tests.conftest import KeyFactory, WorkerFactory


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[TestServer]:
    """The real API app on an ephemeral 127.0.0.1 port."""
    async with TestServer(create_app(settings)) as server:
        yield server


@pytest.fixture
async def admin_key(make_key: KeyFactory) -> str:
    """An admin API key in this test's database."""
    return await make_key("client-tests", admin=True)


@pytest.fixture
async def pq(server: TestServer, admin_key: str) -> AsyncIterator[PromptQClient]:
    """A client for the running API (it opens and closes its own HTTP session)."""
    async with PromptQClient(str(server.make_url("/")), api_key=admin_key, timeout_s=10) as client:
        yield client


@pytest.fixture
async def make_small_server(settings: Settings) -> AsyncIterator[str]:
    """The API with a 2048-byte request limit; yields its base URL."""
    app: web.Application = create_app(settings.with_overrides(api_max_body_bytes=2048))
    async with TestServer(app) as server:
        yield str(server.make_url("/"))


async def wait(pq: PromptQClient, job_id: str) -> dict[str, Any]:
    """The client's own wait, polling fast enough for a test."""
    return await pq.wait(job_id, timeout_s=20, poll_s=0.02)


async def test_submit_wait_get_and_attempts(
    pq: PromptQClient, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a worker, and jobs submitted as a string, a messages list and a document
    await start_worker()
    flaky = "hello [[fake: 503, ok]]"
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]
    by_string = await pq.submit_prompt(flaky, max_attempts=3)
    by_messages = await pq.submit_prompt(
        messages, model="fake-large", params={"temperature": 0.2, "max_tokens": 50}
    )
    summary = await pq.submit_summarize(
        "Alpha beta gamma. " * 30, instructions="Two bullets.", model="fake-large"
    )
    for job in (by_string, by_messages, summary):
        assert job["status"] == "queued" and job["attempts"] == 0
    assert by_string["max_attempts"] == 3
    assert by_string["input"]["messages"] == [{"role": "user", "content": flaky}]
    assert by_messages["input"]["params"] == {"temperature": 0.2, "max_tokens": 50}
    assert summary["kind"] == "summarize"
    assert summary["input"]["instructions"] == "Two bullets."

    # When the client waits for each
    done = [await wait(pq, job["id"]) for job in (by_string, by_messages, summary)]

    # Then each succeeded with the fake model's reply, and get() agrees with wait()
    for job in done:
        assert job["status"] == "succeeded", job
        assert job["usage"]["prompt_tokens"] > 0 and job["usage"]["completion_tokens"] > 0
        assert await pq.get(job["id"]) == job
    flaky_done, messages_done, summary_done = done
    assert flaky_done["result"] == expected_reply("fake-small", by_string["input"]["messages"])
    assert flaky_done["attempts"] == 2 == fake_llm.stats.requests_by_prompt[flaky]
    assert messages_done["result"] == expected_reply("fake-large", messages)
    assert messages_done["model"] == "fake-large"
    assert summary_done["result"].startswith("[fake-large] reply ")
    assert "Two bullets." in summary_done["result"]

    # And the attempt history shows the failed try before the successful one
    attempts = await pq.attempts(flaky_done["id"])
    assert [(a["number"], a["outcome"], a["status_code"]) for a in attempts] == [
        (1, "transient_error", 503),
        (2, "succeeded", 200),
    ]
    assert all(a["worker"] and a["latency_ms"] is not None for a in attempts)
    assert [a["number"] for a in await pq.attempts(messages_done["id"])] == [1]


async def test_failed_job_is_terminal_for_wait(
    pq: PromptQClient, start_worker: WorkerFactory
) -> None:
    # Given a job the model rejects permanently, when the client waits, then it gets the failure
    await start_worker()
    job = await pq.submit_prompt("rejected [[fake: 401]]")
    done = await wait(pq, job["id"])
    assert done["status"] == "failed"
    assert done["error_code"] == "llm_permanent" and "401" in done["error"]
    assert done["result"] is None


async def test_wait_times_out_without_a_worker(pq: PromptQClient) -> None:
    # Given no worker, when the client waits briefly, then TimeoutError names the job
    job = await pq.submit_prompt("nobody runs me")
    with pytest.raises(TimeoutError, match=job["id"]):
        await pq.wait(job["id"], timeout_s=0.05, poll_s=0.01)
    assert (await pq.get(job["id"]))["status"] == "queued"


async def test_idempotency_through_the_client(pq: PromptQClient, service: JobService) -> None:
    # Given a job submitted with a key
    first = await pq.submit_summarize("doc", idempotency_key="client-key")

    # When the same request is submitted again, then the same job comes back
    again = await pq.submit_summarize("doc", idempotency_key="client-key")
    assert again["id"] == first["id"]

    # When the key is reused for another request, then IdempotencyConflict is raised
    with pytest.raises(IdempotencyConflict, match="client-key"):
        await pq.submit_summarize("another doc", idempotency_key="client-key")
    with pytest.raises(IdempotencyConflict):
        await pq.submit_prompt("doc", idempotency_key="client-key")
    assert len(await service.store.list_jobs(limit=500)) == 1


async def test_list_and_iter_jobs(pq: PromptQClient) -> None:
    # Given seven jobs of two kinds
    prompts = [(await pq.submit_prompt(f"job {i}"))["id"] for i in range(5)]
    summaries = [(await pq.submit_summarize(f"document {i}"))["id"] for i in range(2)]
    everything = sorted(prompts + summaries, reverse=True)

    # When one page is listed, then it is the newest jobs and has a cursor to the rest
    page = await pq.list(limit=3)
    assert [job["id"] for job in page["jobs"]] == everything[:3]
    assert page["next_cursor"] == everything[2]
    rest = await pq.list(limit=10, cursor=page["next_cursor"])
    assert [job["id"] for job in rest["jobs"]] == everything[3:]
    assert rest["next_cursor"] is None

    # When every job is iterated two at a time, then each comes once, newest first
    assert [job["id"] async for job in pq.iter_jobs(page_size=2)] == everything
    assert [job["id"] async for job in pq.iter_jobs(page_size=500)] == everything

    # And the filters are passed through
    summarized = [job async for job in pq.iter_jobs(kind="summarize", page_size=1)]
    assert [job["id"] for job in summarized] == sorted(summaries, reverse=True)
    assert all(job["kind"] == "summarize" for job in summarized)
    assert (await pq.list(status="queued", kind="prompt"))["jobs"][0]["id"] == max(prompts)
    assert [job async for job in pq.iter_jobs(status="succeeded")] == []

    # And the inputs come only when asked for (a document can be megabytes)
    assert all(job["input"] is None for job in page["jobs"])
    with_inputs = [job async for job in pq.iter_jobs(kind="summarize", include_input=True)]
    assert [job["input"]["document"] for job in with_inputs] == ["document 1", "document 0"]
    assert (await pq.get(summaries[0]))["input"]["document"] == "document 0"


async def test_errors_raise_the_mapped_exceptions(pq: PromptQClient) -> None:
    # Unknown or malformed ids are NotFound
    for job_id in (str(uuid.uuid4()), "not-a-uuid"):
        with pytest.raises(NotFound, match="no job"):
            await pq.get(job_id)
        with pytest.raises(NotFound):
            await pq.attempts(job_id)
        with pytest.raises(NotFound):
            await pq.wait(job_id, timeout_s=1)

    # Bad requests are InvalidRequest (and not one of its subclasses), with the server's message
    bad_calls: list[tuple[Callable[[], Awaitable[Any]], str]] = [
        (lambda: pq.submit({"kind": "translate"}), "kind"),
        (lambda: pq.submit_prompt([]), "messages"),
        (lambda: pq.submit_prompt("hi", max_attempts=0), "max_attempts"),
        (lambda: pq.submit_prompt("hi", params={"temperature": 5}), "temperature"),
        (lambda: pq.submit_summarize(""), "document"),
        (lambda: pq.list(limit=0), "limit"),
        (lambda: pq.list(status="done"), "status"),
        (lambda: pq.list(cursor="garbage"), "cursor"),
    ]
    for call, word in bad_calls:
        with pytest.raises(InvalidRequest) as caught:
            await call()
        assert type(caught.value) is InvalidRequest
        assert word in caught.value.message


async def test_other_http_errors_raise_mapped_exceptions(
    pq: PromptQClient, make_small_server: str, admin_key: str
) -> None:
    # Given an API with a 2 KiB body limit, when a bigger job is submitted, then InvalidRequest
    async with PromptQClient(make_small_server, api_key=admin_key) as small:
        with pytest.raises(InvalidRequest, match="2048"):
            await small.submit_summarize("x" * 3000)

    # Given a base URL under which nothing is routed, then the route's 404 is NotFound too
    async with PromptQClient(pq.base_url + "/nothing-here", api_key=admin_key) as broken:
        with pytest.raises(NotFound, match="Not Found"):
            await broken.get(str(uuid.uuid4()))


async def test_a_shared_session_is_left_open(server: TestServer, admin_key: str) -> None:
    # Given a session the caller owns, when the client is closed, then the session stays open
    async with aiohttp.ClientSession() as session:
        url = str(server.make_url("/"))
        async with PromptQClient(url, api_key=admin_key, session=session) as pq:
            job = await pq.submit_prompt("shared session")
            assert (await pq.get(job["id"]))["id"] == job["id"]
        assert not session.closed


async def test_error_bodies_of_other_shapes_still_raise_mapped_exceptions() -> None:
    # Given something other than promptq answering (a proxy, a misrouted URL)
    async def proxy_error(request: web.Request) -> web.Response:
        return web.json_response({"error": "Bad Gateway"}, status=502)

    async def html_404(request: web.Request) -> web.Response:
        return web.Response(status=404, text="<html>nope</html>", content_type="text/html")

    async def plain_500(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": "x", "message": "boom"}}, status=500)

    async def too_large(request: web.Request) -> web.Response:
        body = {"error": {"code": "document_too_large", "message": "the document is too large"}}
        return web.json_response(body, status=413)

    app = web.Application()
    app.router.add_get("/api/jobs/large", too_large)
    app.router.add_get("/api/jobs/proxy", proxy_error)
    app.router.add_get("/api/jobs/html", html_404)
    app.router.add_get("/api/jobs/boom", plain_500)
    async with TestServer(app) as other, PromptQClient(str(other.make_url("/"))) as client:
        # When the client reads from it, then each status maps to its exception with a message
        with pytest.raises(PromptQError, match="HTTP 502 from /api/jobs/proxy"):
            await client.get("proxy")
        with pytest.raises(NotFound, match="HTTP 404 from /api/jobs/html"):
            await client.get("html")
        with pytest.raises(PromptQError, match="boom") as caught:
            await client.get("boom")
        assert type(caught.value) is PromptQError
        # and an error code that names an exception is that exception
        with pytest.raises(DocumentTooLarge, match="too large"):
            await client.get("large")


async def test_an_id_is_one_path_segment_and_reaches_no_other_route(
    pq: PromptQClient, service: JobService
) -> None:
    # Given a batch in progress, and ids a caller might pass on from its own users
    batch = await pq.submit_batch(
        [{"kind": "prompt", "messages": [{"role": "user", "content": "x"}]}]
    )
    for job_id in (f"../batches/{batch['id']}", "%2e%2e/batches", "x#", "a/b"):
        # When they are used as job ids, then they name no job, and the batch is untouched
        with pytest.raises(NotFound):
            await pq.cancel_job(job_id)
        with pytest.raises(NotFound):
            await pq.get(job_id)
    with pytest.raises(InvalidRequest, match="empty"):
        await pq.get("")
    assert (await pq.get_batch(batch["id"]))["status"] == "in_progress"


async def test_an_api_that_is_away_or_silent_is_service_unavailable(admin_key: str) -> None:
    # Given no API on a port, and one that accepts but never answers
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    async with PromptQClient(f"http://127.0.0.1:{free_port}", api_key=admin_key) as away:
        # Then the client says it cannot reach the API (and never shows the key)
        with pytest.raises(ServiceUnavailable, match="cannot reach the promptq API") as caught:
            await away.get(str(uuid.uuid4()))
        assert admin_key not in str(caught.value)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, PromptQClient(f"http://127.0.0.1:{port}", timeout_s=0.5) as mute:
        with pytest.raises(ServiceUnavailable, match="did not answer"):
            await mute.wait(str(uuid.uuid4()), timeout_s=30)
        server.close()


async def test_a_key_with_a_trailing_newline_works(server: TestServer, admin_key: str) -> None:
    async with PromptQClient(str(server.make_url("/")), api_key=admin_key + "\n") as pq:
        job = await pq.submit_prompt("key read from a file")
        assert (await pq.get(job["id"]))["id"] == job["id"]


async def test_a_stream_whose_key_is_revoked_raises_unauthorized(
    settings: Settings,
    make_key: KeyFactory,
    service: JobService,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a job that waits (no worker), streamed by a key the API re-checks often
    monkeypatch.setattr(auth, "KEY_RECHECK_S", 0.1)
    key = await make_key("streamer")
    app = create_app(settings.with_overrides(api_key_cache_s=0))
    async with (
        TestServer(app) as server,
        PromptQClient(str(server.make_url("/")), api_key=key, timeout_s=10) as client,
    ):
        job_id = (await client.submit_prompt("wait"))["id"]
        stream = client.stream(job_id, timeout_s=20)
        assert (await anext(stream)).event == "status"
        # When the key is revoked while the stream is open
        await KeyStore(service.store.sessionmaker).revoke("streamer")
        # Then the stream ends with Unauthorized, having told of no other event
        others: list[str] = []
        with pytest.raises(Unauthorized, match="revoked"):
            async with asyncio.timeout(10):
                async for event in stream:
                    others.append(event.event)
        assert others == []
