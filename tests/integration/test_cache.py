"""The result cache on every way in: `POST /api/jobs`, native batches and OpenAI Batch API files.

Given the real API, an in-process worker and the fake LLM, when a deterministic prompt (or one
asking for `cache: true`) repeats a request the same key has had answered, then its job is
written already succeeded with `cached_from` and 0 attempts, is never queued, and the fake
LLM's counters show no call; `cache: false`, another key, or `PROMPTQ_CACHE_ENABLED=false`
make the model run again. (`/v1/chat/completions` is covered in test_openai_chat.)
"""

from __future__ import annotations

import io
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from promptq.service import JobService
from promptq.testing.fake_llm import FakeLLM
from tests.conftest import (
    ApiClient,
    ApiStarter,
    KeyFactory,
    WorkerFactory,
    bearer,
    wait_for,
    wait_terminal,
)

Client = TestClient[web.Request, web.Application]


def prompt(content: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "prompt", "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture
async def key(make_key: KeyFactory) -> str:
    return await make_key("cache-user")


@pytest.fixture
async def api(start_api: ApiStarter, key: str) -> ApiClient:
    return await start_api(bearer(key))


async def submit(api: Client, body: dict[str, Any]) -> dict[str, Any]:
    async with api.post("/api/jobs", json=body) as response:
        assert response.status == 202, await response.text()
        job: dict[str, Any] = await response.json()
        return job


async def answered(api: Client, service: JobService, body: dict[str, Any]) -> dict[str, Any]:
    """Submit a job and wait until it has finished; the finished job."""
    job = await submit(api, body)
    await wait_terminal(service.store, [job["id"]])
    async with api.get(f"/api/jobs/{job['id']}") as response:
        finished: dict[str, Any] = await response.json()
    assert finished["status"] == "succeeded", finished
    return finished


async def create_batch(api: Client, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    async with api.post("/api/batches", json={"jobs": jobs}) as response:
        assert response.status == 201, await response.text()
        batch: dict[str, Any] = await response.json()
        return batch


async def batch_results(api: Client, batch_id: str) -> list[dict[str, Any]]:
    """Wait for the batch to complete; its results in submission order."""

    async def completed() -> bool:
        async with api.get(f"/api/batches/{batch_id}") as response:
            return (await response.json())["status"] == "completed"

    await wait_for(completed, timeout_s=30)
    async with api.get(f"/api/batches/{batch_id}/results") as response:
        return [orjson.loads(line) for line in (await response.read()).splitlines()]


async def test_a_repeated_deterministic_job_is_answered_from_the_cache(
    api: ApiClient, service: JobService, fake_llm: FakeLLM, start_worker: WorkerFactory
) -> None:
    await start_worker()
    body = prompt("what is a cache?", params={"temperature": 0})
    first = await answered(api, service, body)
    calls = fake_llm.stats.total_requests

    # When the same request comes again, it is answered at once, without a model call
    again = await submit(api, body)
    assert again["status"] == "succeeded" and again["attempts"] == 0
    assert again["cached_from"] == first["id"] and again["result"] == first["result"]
    assert again["usage"] == first["usage"]
    # A hit of a hit names the job that ran
    third = await submit(api, body)
    assert third["cached_from"] == first["id"]
    assert fake_llm.stats.total_requests == calls

    # But cache: false, different params or a non-deterministic request run the model
    for other in (
        body | {"cache": False},
        prompt("what is a cache?", params={"temperature": 0, "max_tokens": 50}),
        prompt("what is a cache?"),
    ):
        ran = await answered(api, service, other)
        assert ran["cached_from"] is None and ran["attempts"] == 1
    assert fake_llm.stats.total_requests == calls + 3

    # And cache: true asks for a stored answer for any request
    asked = await submit(api, prompt("what is a cache?", cache=True))
    assert asked["status"] == "succeeded" and asked["cached_from"] is not None
    assert fake_llm.stats.total_requests == calls + 3


async def test_batch_items_with_a_stored_answer_are_created_answered_and_not_queued(
    api: ApiClient,
    key: str,
    start_api: ApiStarter,
    make_key: KeyFactory,
    service: JobService,
    fake_llm: FakeLLM,
    start_worker: WorkerFactory,
) -> None:
    await start_worker()
    seen = {
        text: await answered(api, service, prompt(text, params={"seed": 7}))
        for text in ("alpha", "beta")
    }
    calls = fake_llm.stats.total_requests

    # When a batch repeats two answered requests next to new ones
    items = [
        prompt("alpha", params={"seed": 7}, custom_id="a"),
        prompt("gamma", params={"seed": 7}, custom_id="g"),
        prompt("beta", params={"seed": 7}, custom_id="b"),
        prompt("alpha", params={"seed": 7}, cache=False, custom_id="a-fresh"),
        prompt("alpha", params={"seed": 8}, custom_id="a-other-seed"),
    ]
    batch = await create_batch(api, items)
    assert batch["created"] == 5 and batch["cached"] == 2

    # Then only the other three reach the model, and the results keep submission order
    results = await batch_results(api, batch["id"])
    assert [r["custom_id"] for r in results] == ["a", "g", "b", "a-fresh", "a-other-seed"]
    assert fake_llm.stats.total_requests == calls + 3
    by_id = {r["custom_id"]: r for r in results}
    for custom_id, text in (("a", "alpha"), ("b", "beta")):
        assert by_id[custom_id]["result"] == seen[text]["result"]
        assert by_id[custom_id]["attempts"] == 0
        job = await service.store.get_job(by_id[custom_id]["job_id"])
        assert job is not None and job.cached_from == seen[text]["id"]
    assert all(by_id[c]["attempts"] == 1 for c in ("g", "a-fresh", "a-other-seed"))
    async with api.get(f"/api/batches/{batch['id']}") as response:
        usage = (await response.json())["usage"]
    hits = [by_id["a"], by_id["b"]]
    assert usage["reused_answers"] == len(hits)
    assert usage["reused_tokens"] == sum(r["prompt_tokens"] + r["completion_tokens"] for r in hits)

    # Another key's batch gets no other tenant's answers, and nor does any batch when the
    # cache is off for the deployment
    other = await start_api(bearer(await make_key("other-tenant")))
    assert (await create_batch(other, items[:1]))["cached"] == 0
    off = await start_api(bearer(key), cache_enabled=False)
    assert (await create_batch(off, items[:1]))["cached"] == 0


async def test_openai_batch_lines_reuse_stored_answers(
    api: ApiClient,
    client: openai.AsyncOpenAI,
    service: JobService,
    fake_llm: FakeLLM,
    start_worker: WorkerFactory,
) -> None:
    await start_worker()
    messages = [{"role": "user", "content": "cached through the SDK"}]
    first = await client.chat.completions.create(
        model="fake-small", messages=messages, temperature=0
    )
    calls = fake_llm.stats.total_requests
    lines = [
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "fake-small", "messages": content, "temperature": 0},
        }
        for custom_id, content in (
            ("hit", messages),
            ("miss", [{"role": "user", "content": "new question"}]),
        )
    ]
    upload = await client.files.create(
        file=("in.jsonl", io.BytesIO(b"".join(orjson.dumps(line) + b"\n" for line in lines))),
        purpose="batch",
    )
    batch = await client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    async def done() -> bool:
        nonlocal batch
        batch = await client.batches.retrieve(batch.id)
        return batch.status == "completed"

    await wait_for(done, timeout_s=30)
    assert batch.request_counts is not None and batch.request_counts.completed == 2
    assert batch.output_file_id is not None
    output = (await client.files.content(batch.output_file_id)).read().splitlines()
    answers = {line["custom_id"]: line["response"] for line in map(orjson.loads, output)}
    hit = answers["hit"]["body"]
    assert hit["choices"][0]["message"]["content"] == first.choices[0].message.content
    assert hit["usage"]["completion_tokens"] == first.usage.completion_tokens  # type: ignore[union-attr]
    assert fake_llm.stats.total_requests == calls + 1
    job = await service.store.get_job(answers["hit"]["request_id"])
    assert job is not None and job.cached_from == first.id.removeprefix("chatcmpl-")
    assert job.attempts == 0
