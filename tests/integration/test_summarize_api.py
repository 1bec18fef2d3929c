"""Summarizing over HTTP: file uploads, size and type limits, progress, and the event stream.

Given the real API on an ephemeral port over real Redis and a real database, when files are
uploaded and jobs followed, then every supported file becomes one job with its text, every bad
upload is refused with a JSON error and creates nothing, and the stream tells the job's story
ending with its terminal status.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app
from promptq.client import PromptQClient
from promptq.service import JobService
from promptq.settings import Settings
from promptq.testing.fake_llm import FakeLLM
from tests.conftest import KeyFactory, WorkerFactory, bearer, wait_terminal
from tests.summaries import generate_document, minimal_pdf

Client = TestClient[web.Request, web.Application]
ApiFactory = Callable[..., Awaitable[Client]]
UPLOAD = "/api/jobs/summarize/upload"

HTML = b"""<!doctype html><html><head><title>Ignored title</title>
<style>body { color: red }</style><script>var hidden = "script text";</script></head>
<body><h1>Harbour report</h1><p>The harbour moved <b>4,200</b> tonnes in May.</p>
<noscript>noscript text</noscript><p>Dredging starts in June.</p></body></html>"""


@pytest.fixture(autouse=True)
def realistic_tokenizer(fake_llm: FakeLLM) -> None:
    """The fake counts 4 characters per token, as promptq's estimate assumes."""
    fake_llm.config.chars_per_token = 4.0


@pytest.fixture
async def api_key(make_key: KeyFactory) -> str:
    """A tenant's API key (not an admin's): every job these tests make belongs to it."""
    return await make_key("summarize-tests")


@pytest.fixture
async def make_api(settings: Settings, api_key: str) -> AsyncIterator[ApiFactory]:
    """Start the real API app on an ephemeral port (optionally with settings overrides); its
    client sends `api_key` (tests/integration/test_auth.py covers keys and tenants)."""
    clients: list[Client] = []

    async def make(**overrides: Any) -> Client:
        app = create_app(settings.with_overrides(**overrides))
        client: Client = TestClient(TestServer(app), headers=bearer(api_key))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def form(*files: tuple[str, bytes, str | None], **fields: str) -> aiohttp.FormData:
    """A multipart body with file parts (name, bytes, content type) and option fields."""
    data = aiohttp.FormData()
    for name, body, content_type in files:
        data.add_field("file", body, filename=name, content_type=content_type)
    for key, value in fields.items():
        data.add_field(key, value)
    return data


async def nothing_created(service: JobService) -> bool:
    """No job row and nothing in the queue."""
    rows = await service.store.list_jobs(limit=10)
    queued = await service.queue.redis.zcard(service.queue.queue_name)
    return not rows and not queued


async def test_uploaded_files_become_one_summarize_job_each(
    make_api: ApiFactory, service: JobService, start_worker: WorkerFactory
) -> None:
    # Given a text file, a Markdown file, an HTML page and a PDF
    api = await make_api()
    files = [
        ("notes.txt", b"Plain notes about the harbour.\n", "text/plain"),
        ("guide.md", b"# Guide\n\nDredging *starts* in June.\n", None),
        ("report.html", HTML, "text/html"),
        ("scan.pdf", minimal_pdf(["Quarterly tonnage rose 12%.", "Costs (net) fell."]), None),
    ]

    # When they are uploaded together with options
    body = form(
        *files, instructions="Two bullets.", style="bullets", target_words="40", deadline_s="600"
    )
    async with api.post(UPLOAD, data=body) as response:
        status, payload = response.status, await response.json()

    # Then each is a queued summarize job, in order, carrying its text and the options
    assert status == 202, payload
    jobs = payload["jobs"]
    assert [j["input"]["filename"] for j in jobs] == [f[0] for f in files]
    assert all(j["kind"] == "summarize" and j["status"] == "queued" for j in jobs)
    assert all(j["progress"] == {"chunks_done": 0, "chunks_total": 0, "level": 0} for j in jobs)
    assert all(j["deadline_s"] == 600 and j["deadline_at"] for j in jobs)
    text, markdown, html, pdf = (j["input"] for j in jobs)
    assert text["document"] == "Plain notes about the harbour."
    assert markdown["document"].startswith("# Guide") and markdown["format"] == "markdown"
    assert "format" not in text
    assert "Harbour report" in html["document"] and "4,200" in html["document"]
    for hidden in ("script text", "color: red", "noscript text", "Ignored title"):
        assert hidden not in html["document"]
    assert pdf["document"] == "Quarterly tonnage rose 12%.\nCosts (net) fell."
    for job in jobs:
        options = {k: job["input"][k] for k in ("instructions", "style", "target_words")}
        assert options == {"instructions": "Two bullets.", "style": "bullets", "target_words": 40}

    # And a worker summarizes them all; the API shows each finished with its progress
    await start_worker()
    await wait_terminal(service.store, [j["id"] for j in jobs])
    for job in jobs:
        async with api.get(f"/api/jobs/{job['id']}") as response:
            done = await response.json()
        assert done["status"] == "succeeded", done
        assert done["progress"] == {"chunks_done": 1, "chunks_total": 1, "level": 0}
        assert done["result"].startswith("[fake-small] reply")


def _big(size: int) -> bytes:
    return (b"word " * (size // 5 + 1))[:size]


BAD_UPLOADS: list[tuple[str, list[tuple[str, bytes, str | None]], dict[str, str], int, str]] = [
    ("too large", [("big.txt", _big(3000), None)], {}, 413, "document_too_large"),
    (
        "second file too large",
        [("ok.txt", b"fine", None), ("big.md", _big(3000), None)],
        {},
        413,
        "document_too_large",
    ),
    ("unsupported type", [("memo.docx", b"PK\x03\x04", None)], {}, 422, "unsupported_document"),
    (
        "one bad file among good ones",
        [("ok.txt", b"fine", None), ("tool.exe", b"MZ", "application/octet-stream")],
        {},
        422,
        "unsupported_document",
    ),
    ("broken pdf", [("x.pdf", b"%PDF-1.4 not really", None)], {}, 422, "unsupported_document"),
    ("empty file", [("blank.txt", b"  \n\n ", None)], {}, 422, "unsupported_document"),
    ("not utf-8", [("latin.txt", b"caf\xe9", None)], {}, 422, "unsupported_document"),
    ("bad option", [("ok.txt", b"fine", None)], {"style": "fancy"}, 422, "invalid_request"),
    ("unknown field", [("ok.txt", b"fine", None)], {"colour": "red"}, 422, "invalid_request"),
    (
        "NUL in an option",
        [("ok.txt", b"fine", None)],
        {"instructions": "a\x00b"},
        422,
        "invalid_request",
    ),
    ("bad deadline", [("ok.txt", b"fine", None)], {"deadline_s": "soon"}, 422, "invalid_request"),
    ("zero deadline", [("ok.txt", b"fine", None)], {"deadline_s": "0"}, 422, "invalid_request"),
    ("no files", [], {"instructions": "x"}, 422, "invalid_request"),
]


async def test_bad_uploads_are_refused_and_create_nothing(
    make_api: ApiFactory, service: JobService
) -> None:
    # Given an API that accepts documents of at most 2 KiB
    api = await make_api(max_document_bytes=2048)
    for case, files, fields, status, code in BAD_UPLOADS:
        # When a bad upload arrives
        async with api.post(UPLOAD, data=form(*files, **fields)) as response:
            got_status, body = response.status, await response.json()

        # Then it is refused with the one error shape, and nothing is stored or queued
        assert got_status == status, (case, body)
        assert body["error"]["code"] == code, (case, body)
        assert body["error"]["message"], case
        assert await nothing_created(service), case


async def test_json_documents_and_non_multipart_uploads_are_checked_too(
    make_api: ApiFactory, service: JobService
) -> None:
    api = await make_api(max_document_bytes=2048)

    # A JSON document over the limit is a 413
    body = {"kind": "summarize", "document": "x" * 3000}
    async with api.post("/api/jobs", json=body) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "document_too_large"

    # A JSON document of only whitespace (or invisible characters) is refused: there is
    # nothing to summarize
    for document in (" \n\t\n ", "\u200b\u200b \ufeff\n\u2060"):
        blank = {"kind": "summarize", "document": document}
        async with api.post("/api/jobs", json=blank) as response:
            assert response.status == 422, document
            assert "only whitespace" in (await response.json())["error"]["message"]

    # A JSON body sent to the upload route is told to use multipart
    async with api.post(UPLOAD, json=body) as response:
        assert response.status == 422
        assert "multipart/form-data" in (await response.json())["error"]["message"]
    assert await nothing_created(service)


async def read_events(response: aiohttp.ClientResponse) -> list[tuple[str, Any]]:
    """Every server-sent event of a response, until the server closes the stream."""
    found: list[tuple[str, Any]] = []
    event, data = "message", ""
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event:"):
            event = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data += line[len("data:") :].strip()
        elif not line and data:
            found.append((event, json.loads(data)))
            event, data = "message", ""
    return found


async def test_the_stream_tells_status_progress_and_tokens_and_ends_with_the_result(
    make_api: ApiFactory,
    service: JobService,
    start_worker: WorkerFactory,
    fake_llm: FakeLLM,
    api_key: str,
) -> None:
    # Given a long document queued for summarizing, and a model that streams slowly
    fake_llm.config.latency_ms = 20
    fake_llm.config.stream_chunk_delay_ms = 2
    api = await make_api()
    async with PromptQClient(str(api.make_url("")), api_key=api_key) as client:
        job = await client.submit_summarize(
            generate_document(3_000), context_window=1024, style="paragraph"
        )
    assert (job["input"]["context_window"], job["input"]["style"]) == (1024, "paragraph")

    # When a client follows the job's stream while a worker runs it
    async with asyncio.timeout(30), api.get(f"/api/jobs/{job['id']}/stream") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        await start_worker()
        events = await read_events(response)

    # Then it opened with the queued status, went through running, and ended with success
    kinds = [kind for kind, _ in events]
    statuses = [data["status"] for kind, data in events if kind == "status"]
    assert events[0] == (
        "status",
        {
            "status": "queued",
            "attempts": 0,
            "max_attempts": 5,
            "error": None,
            "error_code": None,
        },
    )
    assert "running" in statuses and statuses[-1] == "succeeded"
    last_kind, last = events[-1]
    assert last_kind == "status" and last["status"] == "succeeded"
    done = await service.store.get_job(job["id"])
    assert done is not None and last["result"] == done.result

    # And progress rose through the map level to the final reduce
    progress = [data for kind, data in events if kind == "progress"]
    map_done = [p["chunks_done"] for p in progress if p["level"] == 0]
    assert map_done == sorted(map_done) and len(set(map_done)) > 2
    assert progress[-1] == {"chunks_done": 1, "chunks_total": 1, "level": progress[-1]["level"]}
    assert progress[-1]["level"] >= 1

    # And the final summary arrived token by token before the terminal status
    tokens = [data["text"] for kind, data in events if kind == "token"]
    assert len(tokens) > 3 and "".join(tokens) == done.result
    assert kinds.index("token") < len(kinds) - 1


async def test_the_stream_of_a_finished_or_unknown_job(
    make_api: ApiFactory, service: JobService, start_worker: WorkerFactory
) -> None:
    api = await make_api()
    async with api.get("/api/jobs/01a20000-0000-7000-8000-000000000000/stream") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "not_found"

    # A finished prompt job's stream is just its terminal status
    body = {"kind": "prompt", "messages": [{"role": "user", "content": "hi"}]}
    async with api.post("/api/jobs", json=body) as response:
        job = await response.json()
    await start_worker()
    await wait_terminal(service.store, [job["id"]])
    async with asyncio.timeout(10), api.get(f"/api/jobs/{job['id']}/stream") as response:
        events = await read_events(response)
    assert [(kind, data["status"]) for kind, data in events] == [("status", "succeeded")]
    assert events[0][1]["result"].startswith("[fake-small] reply")
