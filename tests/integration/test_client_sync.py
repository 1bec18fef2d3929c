"""The blocking client (`promptq.Client`) and job streams, against the real API and a worker.

Given the real API on a real port over real Redis and a real database, and an in-process worker
calling the fake LLM, when a program uses the blocking client (from a thread, as a producer
service would) or the async client, then it submits jobs, waits with progress callbacks,
streams a job's events to its terminal status, and gets API errors as the mapped exceptions.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from api.app import create_app
from promptq import Client, PromptQClient, SyncPromptQClient
from promptq.errors import NotFound
from promptq.settings import Settings
from promptq.sse import ServerEvent
from promptq.testing.fake_llm import expected_reply
from tests.conftest import KeyFactory, WorkerFactory

#: The clients don't depend on the database (tests/integration/test_client.py covers both).
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
async def api(settings: Settings, make_key: KeyFactory) -> AsyncIterator[tuple[str, str]]:
    """(base URL, admin key) of the real API app on an ephemeral 127.0.0.1 port."""
    key = await make_key("sync-client-tests", admin=True)
    async with TestServer(create_app(settings)) as server:
        yield str(server.make_url("/")), key


@pytest.fixture
async def sync_pq(api: tuple[str, str]) -> AsyncIterator[SyncPromptQClient]:
    """A blocking client of `api` (call it through asyncio.to_thread); closed at the end."""
    url, key = api
    pq = await asyncio.to_thread(SyncPromptQClient, url, api_key=key, timeout_s=10)
    yield pq
    await asyncio.to_thread(pq.close)


def user(content: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


def test_every_async_method_is_there_and_blocking() -> None:
    names = [
        name
        for name, member in inspect.getmembers(PromptQClient)
        if not name.startswith("_")
        and (inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member))
    ]
    assert {"submit", "submit_prompt", "wait", "stream", "iter_jobs"} <= set(names)
    with Client("http://127.0.0.1:9") as pq:
        assert Client is SyncPromptQClient
        for name in names:
            method = getattr(pq, name)
            assert callable(method) and not inspect.iscoroutinefunction(method), name
            assert name in dir(pq)
        with pytest.raises(AttributeError):
            _ = pq._request


@SQLITE_ONLY
async def test_sync_client_waits_with_progress_then_streams(
    sync_pq: SyncPromptQClient, start_worker: WorkerFactory
) -> None:
    pq = sync_pq
    content = "[[fake: 500, ok]] sync hello"
    job = await asyncio.to_thread(pq.submit_prompt, content)
    seen: list[dict[str, Any]] = []
    first_seen = threading.Event()

    def progress(job: dict[str, Any]) -> None:
        seen.append(job)
        first_seen.set()

    waiting = asyncio.create_task(
        asyncio.to_thread(pq.wait, job["id"], timeout_s=30, poll_s=0.02, progress=progress)
    )
    assert await asyncio.to_thread(first_seen.wait, 10)
    await start_worker()  # only now can the job move on
    done = await waiting

    assert seen[0]["status"] == "queued" and seen[0]["attempts"] == 0
    assert seen[-1] == done and done["status"] == "succeeded" and done["attempts"] == 2
    keys = [(j["status"], j["attempts"]) for j in seen]
    assert len(keys) == len(set(keys)), "progress is called on changes only"
    assert done["result"] == expected_reply("fake-small", user(content))

    slow = "[[fake: sleep:300, ok]] stream me"
    job2 = await asyncio.to_thread(pq.submit_prompt, slow)
    events: list[ServerEvent] = await asyncio.to_thread(lambda: list(pq.stream(job2["id"])))
    assert all(e.event == "status" for e in events)
    assert events[-1].data["status"] == "succeeded"
    assert events[-1].data["result"] == expected_reply("fake-small", user(slow))
    assert events[0].data["status"] in {"queued", "running"}

    with pytest.raises(NotFound):
        await asyncio.to_thread(pq.get, "01a2aaaa-0000-7000-8000-000000000000")

    # Leaving a stream early closes it cleanly; the client keeps working.
    job3 = await asyncio.to_thread(pq.submit_prompt, "[[fake: sleep:200, ok]] early exit")

    def first_event() -> ServerEvent:
        for event in pq.stream(job3["id"]):
            return event
        raise AssertionError("no event")

    assert (await asyncio.to_thread(first_event)).event == "status"
    assert (await asyncio.to_thread(pq.wait, job3["id"], timeout_s=20))["status"] == "succeeded"
    await asyncio.to_thread(pq.close)
    await asyncio.to_thread(pq.close)  # idempotent


@SQLITE_ONLY
async def test_async_stream_and_progress(api: tuple[str, str], start_worker: WorkerFactory) -> None:
    url, key = api
    await start_worker()
    async with PromptQClient(url, api_key=key, timeout_s=10) as pq:
        content = "[[fake: sleep:300, ok]] async stream"
        job = await pq.submit_prompt(content)
        events = [event async for event in pq.stream(job["id"])]
        assert events[-1].event == "status" and events[-1].data["status"] == "succeeded"
        assert events[-1].data["result"] == expected_reply("fake-small", user(content))

        calls: list[str] = []

        async def progress(job: dict[str, Any]) -> None:
            calls.append(job["status"])

        done = await pq.wait(job["id"], progress=progress)
        assert calls == [done["status"]] == ["succeeded"]

        with pytest.raises(NotFound):
            async for _ in pq.stream("01a2aaaa-0000-7000-8000-000000000000"):
                pass


@SQLITE_ONLY
async def test_sync_client_has_the_batch_methods_too(
    api: tuple[str, str], start_worker: WorkerFactory
) -> None:
    """Methods added to the async client (here: batches) work blocking, unchanged."""
    url, key = api
    await start_worker()
    items = [
        {"kind": "prompt", "custom_id": f"b{i}", "messages": user(f"batch item {i}")}
        for i in range(3)
    ]

    def produce() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        with Client(url, api_key=key, timeout_s=10) as pq:
            batch = pq.submit_batch(items, name="sync")
            done = pq.wait_batch(batch["id"], timeout_s=30, poll_s=0.05)
            return done, list(pq.batch_results(batch["id"]))

    done, results = await asyncio.to_thread(produce)
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 3
    assert [r["custom_id"] for r in results] == ["b0", "b1", "b2"]


@SQLITE_ONLY
async def test_a_callback_that_calls_the_client_gets_an_error_not_a_hang(
    sync_pq: SyncPromptQClient, start_worker: WorkerFactory
) -> None:
    pq = sync_pq
    job = await asyncio.to_thread(pq.submit_prompt, "called back")
    await start_worker()

    # When wait's progress callback calls the client (it runs on the client's loop)
    def progress(seen: dict[str, Any]) -> None:
        pq.attempts(seen["id"])

    # Then a RuntimeError says why, instead of waiting forever for its own loop
    with pytest.raises(RuntimeError, match="cannot be called from its own callbacks"):
        await asyncio.wait_for(
            asyncio.to_thread(pq.wait, job["id"], timeout_s=20, progress=progress), 30
        )
    # And the client still works; a closed one says it is closed
    assert (await asyncio.to_thread(pq.get, job["id"]))["id"] == job["id"]
    await asyncio.to_thread(pq.close)
    with pytest.raises(RuntimeError, match="closed"):
        await asyncio.to_thread(pq.get, job["id"])


def loop_threads() -> int:
    """Live background threads of sync clients."""
    return sum(t.name == "promptq-client-loop" and t.is_alive() for t in threading.enumerate())


@SQLITE_ONLY
async def test_a_client_nobody_closed_is_closed_when_collected(api: tuple[str, str]) -> None:
    # Given a blocking client that was used, then dropped without close()
    url, key = api
    before = loop_threads()

    def use_and_drop() -> PromptQClient:
        pq = SyncPromptQClient(url, api_key=key, timeout_s=10)
        assert pq.list_batches()["batches"] == []  # its HTTP session is open now
        assert loop_threads() == before + 1
        return pq.async_client

    inner = await asyncio.to_thread(use_and_drop)
    gc.collect()

    # Then its HTTP session is closed and its thread is gone
    assert inner._session is None
    assert loop_threads() == before
