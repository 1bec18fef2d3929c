"""Batches through the Python client, and model comparison, against the real API.

Given the API on a real port and an in-process worker calling the fake LLM, when a program
submits a comparison batch with PromptQClient (from a generator), then every item runs on every
model, `compare` shows each model's answer with its latency and tokens side by side, and the
results stream back in submission order; errors arrive as the mapped exceptions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from api.app import create_app
from promptq.client import PromptQClient
from promptq.errors import InvalidBatch, NotCancellable, NotFound
from promptq.settings import Settings
from promptq.sync_client import SyncPromptQClient
from promptq.testing.fake_llm import FakeLLM, expected_reply
from tests.conftest import KeyFactory, WorkerFactory

MODELS = ["fake-small", "fake-large"]


@pytest.fixture
async def pq(settings: Settings, make_key: KeyFactory) -> AsyncIterator[PromptQClient]:
    """A client for the real API app on an ephemeral port, with an admin key."""
    key = await make_key("batch-client", admin=True)
    async with (
        TestServer(create_app(settings)) as server,
        PromptQClient(str(server.make_url("/")), api_key=key, timeout_s=10) as client,
    ):
        yield client


def items(n: int) -> Iterator[dict[str, Any]]:
    """n prompt items with custom ids, lazily."""
    for i in range(n):
        yield {
            "kind": "prompt",
            "custom_id": f"q{i}",
            "messages": [{"role": "user", "content": f"question {i}"}],
        }


async def test_compare_models_side_by_side(
    pq: PromptQClient, fake_llm: FakeLLM, start_worker: WorkerFactory
) -> None:
    batch = await pq.submit_batch(items(4), name="compare", models=MODELS)
    assert batch["total"] == 8 and batch["models"] == MODELS
    await start_worker()
    done = await pq.wait_batch(batch["id"], timeout_s=30, poll_s=0.05)
    assert done["status"] == "completed" and done["counts"]["succeeded"] == 8

    page = await pq.compare(batch["id"], limit=3)
    assert page["models"] == MODELS and page["next_cursor"] == 2
    rest = await pq.compare(batch["id"], cursor=page["next_cursor"])
    rows = page["rows"] + rest["rows"]
    assert [row["index"] for row in rows] == [0, 1, 2, 3]
    assert rest["next_cursor"] is None
    for i, row in enumerate(rows):
        assert row["custom_id"] == f"q{i}" and row["prompt"] == f"question {i}"
        messages = [{"role": "user", "content": f"question {i}"}]
        for model in MODELS:
            answer = row["answers"][model]
            assert answer["status"] == "succeeded"
            assert answer["result"] == expected_reply(model, messages)
            assert answer["latency_ms"] is not None
            assert answer["prompt_tokens"] > 0 and answer["completion_tokens"] > 0
    # And each page's summary is of the whole batch, as its rows add up
    assert page["summary"] == rest["summary"]
    for summary in page["summary"]:
        answers = [row["answers"][summary["model"]] for row in rows]
        latencies = [a["latency_ms"] for a in answers]
        assert (summary["succeeded"], summary["failed"]) == (4, 0)
        assert summary["prompt_tokens"] == sum(a["prompt_tokens"] for a in answers)
        assert summary["completion_tokens"] == sum(a["completion_tokens"] for a in answers)
        assert summary["mean_latency_ms"] == pytest.approx(sum(latencies) / 4, abs=0.1)  # rounded

    results = [record async for record in pq.batch_results(batch["id"])]
    assert [r["index"] for r in results] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert {(r["index"], r["model"]) for r in results} == {(i, m) for i in range(4) for m in MODELS}
    assert sum(r["prompt_tokens"] for r in results) == done["usage"]["prompt_tokens"]

    with pytest.raises(NotCancellable):
        await pq.cancel_batch(batch["id"])
    with pytest.raises(NotCancellable):
        await pq.cancel_job(results[0]["job_id"])


async def test_client_errors(pq: PromptQClient) -> None:
    bad = [{"kind": "prompt", "messages": []}, {"kind": "prompt"}]
    with pytest.raises(InvalidBatch) as raised:
        await pq.submit_batch(bad)
    assert [line["line"] for line in raised.value.lines] == [1, 2]
    with pytest.raises(NotFound):
        await pq.get_batch("00000000-0000-0000-0000-000000000000")
    with pytest.raises(NotFound):
        async for _ in pq.batch_results("00000000-0000-0000-0000-000000000000"):
            pass
    page = await pq.list_batches()
    assert page == {"batches": [], "next_cursor": None}


async def test_cancel_through_the_client(pq: PromptQClient) -> None:
    batch = await pq.submit_batch(items(3))
    first, *_ = [r async for r in pq.batch_results(batch["id"])]
    job = await pq.cancel_job(first["job_id"])
    assert job["status"] == "cancelled"
    cancelled = await pq.cancel_batch(batch["id"])
    assert cancelled["status"] == "cancelled" and cancelled["counts"]["cancelled"] == 3


async def test_the_sync_client_has_the_batch_methods_too(
    settings: Settings, make_key: KeyFactory
) -> None:
    key = await make_key("batch-sync", admin=True)
    async with TestServer(create_app(settings)) as server:
        url = str(server.make_url("/"))

        def use() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            with SyncPromptQClient(url, api_key=key, timeout_s=10) as pq:
                batch = pq.submit_batch(list(items(2)), name="sync")
                return batch, list(pq.batch_results(batch["id"]))

        # The sync client runs its own loop in a thread; the server runs on this one.
        batch, results = await asyncio.to_thread(use)
    assert batch["name"] == "sync" and batch["total"] == 2
    assert [r["custom_id"] for r in results] == ["q0", "q1"]
