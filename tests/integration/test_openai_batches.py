"""The OpenAI Batch API (`/v1/files`, `/v1/batches`) with the official `openai` package.

Given the real API, an in-process worker and the fake LLM, when a user uploads a JSONL file
and makes a batch of it with the SDK, then the requests run as promptq jobs of one batch, the
batch goes through OpenAI's lifecycle, and its output file holds each request's answer in
input order; a bad file fails the batch with per-line errors; cancelling keeps the answers
already made; files and batches are private to the key that made them.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import openai
import orjson
import pytest
from sqlalchemy import select, update

from promptq import clock
from promptq.models import Batch, Job, JobStatus, Priority
from promptq.service import JobService
from promptq.testing.fake_llm import FakeLLM, expected_reply
from tests.conftest import ApiClient, ApiStarter, KeyFactory, SdkFactory, WorkerFactory, wait_for


def request_line(custom_id: str, content: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "fake-small", "messages": [{"role": "user", "content": content}]} | body,
    }


def jsonl(lines: list[Any]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def base_url(api: ApiClient) -> str:
    return str(api.make_url("/v1"))


@pytest.fixture
async def api(start_api: ApiStarter) -> ApiClient:
    return await start_api()


@pytest.fixture
async def key(make_key: KeyFactory) -> str:
    return await make_key("batch-user")


async def upload(client: openai.AsyncOpenAI, lines: list[Any]) -> str:
    created = await client.files.create(
        file=("input.jsonl", io.BytesIO(jsonl(lines))), purpose="batch"
    )
    return created.id


async def wait_status(
    client: openai.AsyncOpenAI, batch_id: str, statuses: set[str], timeout_s: float = 30
) -> Any:
    found: list[Any] = []

    async def reached() -> bool:
        batch = await client.batches.retrieve(batch_id)
        found[:] = [batch]
        return batch.status in statuses

    await wait_for(reached, timeout_s=timeout_s, interval_s=0.1)
    return found[0]


async def read_lines(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    content = await client.files.content(file_id)
    return [orjson.loads(line) for line in content.read().splitlines() if line.strip()]


async def test_a_batch_from_a_file_runs_to_completion_and_its_output_file_reads_back(
    api: ApiClient,
    sdk: SdkFactory,
    client: openai.AsyncOpenAI,
    key: str,
    make_key: KeyFactory,
    start_worker: WorkerFactory,
    service: JobService,
) -> None:
    await start_worker()
    lines = [request_line(f"req-{i}", f"question {i}") for i in range(6)]
    lines.append(request_line("req-bad", "[[fake: 400]] refused"))
    file_id = await upload(client, lines)

    batch = await client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"purpose": "test"},
    )
    assert batch.status == "in_progress" and batch.request_counts is not None
    assert batch.request_counts.total == 7 and batch.metadata == {"purpose": "test"}

    done = await wait_status(client, batch.id, {"completed"})
    assert done.request_counts.completed == 6 and done.request_counts.failed == 1
    assert done.completed_at and done.finalizing_at and done.in_progress_at

    # The output file holds every answered request, in input order, in OpenAI's line shape
    output = await read_lines(client, done.output_file_id)
    assert [line["custom_id"] for line in output] == [f"req-{i}" for i in range(6)]
    for i, line in enumerate(output):
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        messages = lines[i]["body"]["messages"]
        assert body["choices"][0]["message"]["content"] == expected_reply("fake-small", messages)
    errors = await read_lines(client, done.error_file_id)
    assert [line["custom_id"] for line in errors] == ["req-bad"]
    assert errors[0]["response"]["status_code"] == 400

    # And the requests are promptq jobs of the batch, bulk priority, queryable in SQL
    async with service.store.sessionmaker() as session:
        jobs = list((await session.execute(select(Job).where(Job.batch_id == batch.id))).scalars())
    assert sorted(j.custom_id or "" for j in jobs) == sorted(line["custom_id"] for line in lines)
    assert {j.priority for j in jobs} == {Priority.BULK}

    # And the sync client reads the same batch
    def sync_read() -> tuple[str, int]:
        with openai.OpenAI(base_url=base_url(api), api_key=key, max_retries=0) as sync:
            listed = sync.batches.list()
            return sync.batches.retrieve(batch.id).status, len(listed.data)

    assert await asyncio.to_thread(sync_read) == ("completed", 1)

    # Another key sees neither the files nor the batch; an admin key sees both
    other = sdk(await make_key("other"))
    with pytest.raises(openai.NotFoundError):
        await other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        await other.files.content(file_id)
    assert (await other.batches.list()).data == []
    assert (await other.files.list()).data == []
    admin = sdk(await make_key("admin", admin=True))
    assert (await admin.batches.retrieve(batch.id)).status == "completed"


async def test_each_output_line_names_the_model_that_answered_it(
    client: openai.AsyncOpenAI, start_worker: WorkerFactory
) -> None:
    await start_worker()
    # Given requests that fall back (fake-small refuses each content the first time), two of
    # them identical and deterministic (the second takes the first's answer)
    fallback: dict[str, Any] = {"fallback_models": ["fake-large"], "temperature": 0}
    lines = [
        request_line("first", "[[fake: 404, ok]] who answers?", **fallback),
        request_line("same", "[[fake: 404, ok]] who answers?", **fallback),
        request_line("plain", "nothing special", **fallback),
    ]
    batch = await client.batches.create(
        input_file_id=await upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = await wait_status(client, batch.id, {"completed"})

    # Then each answer is labelled with the model whose answer it is
    output = {
        line["custom_id"]: line["response"]["body"]
        for line in await read_lines(client, done.output_file_id)
    }
    assert output.keys() == {"first", "same", "plain"}
    for line in lines:
        body = output[line["custom_id"]]
        reply = body["choices"][0]["message"]["content"]
        assert reply == expected_reply(body["model"], line["body"]["messages"])
    assert output["first"]["model"] == "fake-large" and output["plain"]["model"] == "fake-small"


async def test_identical_requests_the_model_refuses_are_refused_alike_with_one_call(
    client: openai.AsyncOpenAI, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    await start_worker()
    # Given a file with the same deterministic request twice, which the model refuses (a 400)
    refused: dict[str, Any] = {"temperature": 0}
    lines = [request_line(f"r{i}", "[[fake: 400]] refused twice?", **refused) for i in range(2)]
    batch = await client.batches.create(
        input_file_id=await upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = await wait_status(client, batch.id, {"completed"})

    # Then the model was asked once, and both lines carry its refusal, status 400 included
    assert fake_llm.stats.total_requests == 1
    assert done.request_counts is not None and done.request_counts.failed == 2
    errors = await read_lines(client, done.error_file_id)
    assert [line["custom_id"] for line in errors] == ["r0", "r1"]
    assert {line["response"]["status_code"] for line in errors} == {400}
    assert len({orjson.dumps(line["response"]["body"]) for line in errors}) == 1


async def test_a_bad_file_fails_the_batch_with_an_error_per_bad_line(
    client: openai.AsyncOpenAI, service: JobService
) -> None:
    lines: list[Any] = [
        request_line("ok-1", "fine"),
        request_line("ok-1", "duplicate id"),
        request_line("no-model", "x") | {"body": {"messages": []}},
        request_line("wrong-url", "x") | {"url": "/v1/embeddings"},
        request_line("unknown", "x", model="no-such-model"),
    ]
    content = jsonl(lines) + b"{not json\n"
    file_id = (
        await client.files.create(file=("bad.jsonl", io.BytesIO(content)), purpose="batch")
    ).id

    batch = await client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors is not None and batch.errors.data is not None
    by_line = {e.line: e.code for e in batch.errors.data}
    assert by_line == {
        2: "duplicate_custom_id",
        3: "invalid_request",
        4: "invalid_url",
        5: "model_not_found",
        6: "invalid_json_line",
    }
    async with service.store.sessionmaker() as session:
        count = len(list((await session.execute(select(Job.id))).scalars()))
    assert count == 0  # nothing of a failed batch runs

    with pytest.raises(openai.BadRequestError):
        await client.batches.create(
            input_file_id=file_id, endpoint="/v1/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        await client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )


async def test_cancelling_a_batch_midway_keeps_the_finished_answers(
    client: openai.AsyncOpenAI, fake_llm: FakeLLM, start_worker: WorkerFactory
) -> None:
    fake_llm.config.latency_ms = 150
    await start_worker(worker_concurrency=2)
    lines = [request_line(f"r{i}", f"slow {i}") for i in range(20)]
    batch = await client.batches.create(
        input_file_id=await upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    await wait_for(lambda: _completed_at_least(client, batch.id, 3), timeout_s=30)

    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")

    done = await wait_status(client, batch.id, {"cancelled"})
    assert done.cancelling_at is not None and done.cancelled_at is not None
    output = await read_lines(client, done.output_file_id)
    errors = await read_lines(client, done.error_file_id)
    assert len(output) == done.request_counts.completed >= 3
    assert len(output) < 20
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert sorted(line["custom_id"] for line in output + errors) == sorted(
        f"r{i}" for i in range(20)
    )
    calls = fake_llm.stats.total_requests
    assert calls < 20  # the cancelled requests never reached the model


async def _completed_at_least(client: openai.AsyncOpenAI, batch_id: str, n: int) -> bool:
    batch = await client.batches.retrieve(batch_id)
    return batch.request_counts is not None and batch.request_counts.completed >= n


async def test_a_batch_past_its_window_expires_and_keeps_nothing_running(
    client: openai.AsyncOpenAI, service: JobService
) -> None:
    lines = [request_line(f"e{i}", f"later {i}") for i in range(3)]
    batch = await client.batches.create(
        input_file_id=await upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    async with service.store.sessionmaker() as session, session.begin():
        await session.execute(
            update(Batch).where(Batch.id == batch.id).values(expires_at=clock.now())
        )

    expired = await client.batches.retrieve(batch.id)

    assert expired.status == "expired" and expired.expired_at is not None
    errors = await read_lines(client, expired.error_file_id)
    assert [line["error"]["code"] for line in errors] == ["batch_expired"] * 3
    async with service.store.sessionmaker() as session:
        statuses = set((await session.execute(select(Job.status))).scalars())
    assert statuses == {JobStatus.CANCELLED}


async def test_files_and_batches_list_in_pages(client: openai.AsyncOpenAI) -> None:
    ids = [await upload(client, [request_line("a", "page")]) for _ in range(3)]
    batches = [
        (
            await client.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        ).id
        for file_id in ids
    ]
    first = await client.batches.list(limit=2)
    assert [b.id for b in first.data] == batches[::-1][:2] and first.has_more
    rest = await client.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in rest.data] == batches[:1] and not rest.has_more
    seen = [b.id async for b in client.batches.list(limit=1)]
    assert seen == batches[::-1]
    files = [f.id async for f in client.files.list(purpose="batch")]
    assert files == ids[::-1]

    deleted = await client.files.delete(ids[0])
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(ids[0])
