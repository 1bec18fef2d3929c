"""/v1 behaves as OpenAI's API does where promptq used to differ.

Given the real API (in-process, real port) on SQLite and on PostgreSQL, when a client sends
/v1 requests over plain HTTP, then unknown models are 404 `model_not_found`, every unreadable
or invalid chat body is a 400 `invalid_request_error` (empty, malformed, off-schema, a seed
outside 64 bits), an OpenAI batch cancelled through the native route ends `cancelled` in
OpenAI's view exactly as through /v1, and an input line whose custom_id holds a NUL fails the
batch with a per-line error and creates no job.
"""

from __future__ import annotations

import io
import json
from typing import Any

import openai
import orjson
import pytest
from sqlalchemy import func, select, update

from promptq import clock
from promptq.models import Batch, Job
from promptq.service import JobService
from tests.conftest import ApiClient, ApiStarter, KeyFactory, bearer

CHAT = "/v1/chat/completions"
MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def chat_body(**fields: Any) -> bytes:
    """A chat request as JSON (by `json`: orjson refuses integers outside 64 bits)."""
    return json.dumps({"model": "fake-small", "messages": MESSAGES} | fields).encode()


def request_line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": "fake-small", "messages": MESSAGES} | body,
    }


@pytest.fixture
async def api(start_api: ApiStarter) -> ApiClient:
    """The API with no worker: a request that is wrongly accepted answers 504 within 1 s."""
    return await start_api(chat_wait_s=1)


@pytest.fixture
async def key(make_key: KeyFactory) -> str:
    return await make_key("conformance-user")


async def post(api: ApiClient, key: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """POST a raw JSON body; (status, the `error` object of the answer)."""
    headers = bearer(key) | {"Content-Type": "application/json"}
    async with api.post(path, data=body, headers=headers) as response:
        return response.status, (await response.json())["error"]


async def make_batch(client: openai.AsyncOpenAI, lines: list[dict[str, Any]]) -> Any:
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = await client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    return await client.batches.create(
        input_file_id=upload.id, endpoint=CHAT, completion_window="24h"
    )


async def job_count(service: JobService) -> int:
    async with service.store.sessionmaker() as session:
        return int((await session.execute(select(func.count()).select_from(Job))).scalar_one())


# -- errors ------------------------------------------------------------------------------------


async def test_an_unknown_model_is_a_404_model_not_found(api: ApiClient, key: str) -> None:
    status, error = await post(api, key, CHAT, chat_body(model="no-such-model"))

    assert status == 404
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "fake-small" in error["message"]  # it names the models that are served


async def test_the_sdk_raises_not_found_for_an_unknown_model(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert unknown.value.code == "model_not_found"


#: (case, raw body): chat requests that cannot run; OpenAI answers each with a 400.
BAD_CHAT_BODIES: list[tuple[str, bytes]] = [
    ("empty body", b""),
    ("blank body", b"  \n "),
    ("malformed JSON", b'{"model": "fake-small",'),
    ("a JSON array", b"[1, 2]"),
    ("no messages", orjson.dumps({"model": "fake-small"})),
    ("seed above 64 bits", chat_body(seed=2**64 - 1)),
    ("seed just above int64", chat_body(seed=INT64_MAX + 1)),
    ("seed just below int64", chat_body(seed=INT64_MIN - 1)),
]


@pytest.mark.parametrize(("case", "body"), BAD_CHAT_BODIES, ids=[c for c, _ in BAD_CHAT_BODIES])
async def test_a_chat_body_that_cannot_run_is_a_400_invalid_request_error(
    api: ApiClient, key: str, service: JobService, case: str, body: bytes
) -> None:
    status, error = await post(api, key, CHAT, body)

    assert status == 400, (case, error)
    assert error["type"] == "invalid_request_error"
    assert {"message", "type", "param", "code"} <= error.keys() and error["message"]
    assert await job_count(service) == 0


async def test_an_empty_batch_create_body_is_a_400(api: ApiClient, key: str) -> None:
    status, error = await post(api, key, "/v1/batches", b"")

    assert status == 400 and error["type"] == "invalid_request_error"


async def test_a_batch_line_takes_the_seed_range_of_api_jobs(
    client: openai.AsyncOpenAI, service: JobService
) -> None:
    lines = [
        request_line("lowest", seed=INT64_MIN),
        request_line("highest", seed=INT64_MAX),
        request_line("too-high", seed=2**64 - 1),
    ]

    batch = await make_batch(client, lines)

    assert batch.status == "failed" and batch.errors is not None
    assert [(e.line, e.code) for e in batch.errors.data] == [(3, "invalid_request")]
    assert await job_count(service) == 0


# -- batches -----------------------------------------------------------------------------------


async def test_a_native_cancel_ends_the_openai_batch_cancelled_as_v1_cancel_does(
    api: ApiClient, key: str, client: openai.AsyncOpenAI
) -> None:
    # Given an OpenAI batch whose requests wait for a worker
    batch = await make_batch(client, [request_line(f"c{i}") for i in range(3)])
    assert batch.status == "in_progress"

    # When it is cancelled through the native route
    async with api.post(f"/api/batches/{batch.id}/cancel", headers=bearer(key)) as response:
        assert response.status == 202, await response.text()
        native = await response.json()

    # Then OpenAI's view goes cancelling → cancelled, never completed
    assert native["status"] == "cancelling" and native["cancelled_at"] is None
    done = await client.batches.retrieve(batch.id)
    assert done.status == "cancelled"
    assert done.cancelling_at is not None and done.cancelled_at is not None
    assert done.cancelled_at >= done.cancelling_at
    assert done.completed_at is None and done.expired_at is None
    assert done.output_file_id is None and done.error_file_id is not None
    errors = (await client.files.content(done.error_file_id)).read().splitlines()
    assert [orjson.loads(line)["error"]["code"] for line in errors] == ["batch_cancelled"] * 3

    # And cancelling it again changes nothing, through either route
    assert (await client.batches.cancel(batch.id)).status == "cancelled"
    async with api.post(f"/api/batches/{batch.id}/cancel", headers=bearer(key)) as response:
        assert response.status == 409


async def test_a_v1_cancel_and_an_expiry_keep_their_own_stamps(
    client: openai.AsyncOpenAI, service: JobService
) -> None:
    cancelled = await make_batch(client, [request_line("a")])
    expiring = await make_batch(client, [request_line("b")])
    async with service.store.sessionmaker() as session, session.begin():
        await session.execute(
            update(Batch).where(Batch.id == expiring.id).values(expires_at=clock.now())
        )

    await client.batches.cancel(cancelled.id)
    ended = await client.batches.retrieve(cancelled.id)
    expired = await client.batches.retrieve(expiring.id)

    assert ended.status == "cancelled" and ended.cancelling_at and ended.cancelled_at
    assert expired.status == "expired" and expired.expired_at is not None
    assert expired.cancelling_at is None and expired.cancelled_at is None


async def test_a_native_cancel_of_a_finished_openai_batch_is_a_409(
    api: ApiClient, key: str, client: openai.AsyncOpenAI, service: JobService
) -> None:
    batch = await make_batch(client, [request_line("f")])
    async with service.store.sessionmaker() as session, session.begin():
        await session.execute(update(Batch).where(Batch.id == batch.id).values(status="finalizing"))

    async with api.post(f"/api/batches/{batch.id}/cancel", headers=bearer(key)) as response:
        assert response.status == 409, await response.text()


async def test_a_custom_id_with_a_nul_fails_its_line_and_creates_nothing(
    client: openai.AsyncOpenAI, service: JobService
) -> None:
    lines = [request_line("fine"), request_line("bad\x00id")]

    batch = await make_batch(client, lines)

    assert batch.status == "failed" and batch.errors is not None
    (error,) = batch.errors.data
    assert (error.line, error.code, error.param) == (2, "invalid_value", "custom_id")
    assert error.message is not None and "NUL" in error.message
    assert await job_count(service) == 0
