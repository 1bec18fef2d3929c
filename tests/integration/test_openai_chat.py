"""`/v1/chat/completions` and `/v1/models` with the official `openai` package as the client.

Given the real API (in-process, real port), an in-process worker and the fake LLM, when code
written for the OpenAI SDK points its base_url at promptq's /v1, then it gets the answers (as
objects and as a stream), its errors as the SDK's own exceptions, and every request is a job
in SQL; identical deterministic requests are answered from the cache without a model call.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import openai
import pytest

from promptq.models import JobStatus, Priority
from promptq.service import JobService
from promptq.testing.fake_llm import FakeLLM, FakeLLMConfig, expected_reply
from tests.conftest import ApiClient, ApiStarter, KeyFactory, SdkFactory, WorkerFactory, bearer

JOB_ID_HEADER = "x-promptq-job-id"


def user(content: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


def base_url(api: ApiClient) -> str:
    return str(api.make_url("/v1"))


@pytest.fixture
async def key(make_key: KeyFactory) -> str:
    return await make_key("sdk-user")


@pytest.fixture
async def api(start_api: ApiStarter) -> ApiClient:
    return await start_api()


async def test_sync_and_async_clients_get_completions_stored_as_interactive_jobs(
    api: ApiClient,
    key: str,
    client: openai.AsyncOpenAI,
    start_worker: WorkerFactory,
    service: JobService,
) -> None:
    await start_worker()
    messages = user("What is a queue?")

    # When the async client asks (the code from the tutorials, base_url changed)
    raw = await client.chat.completions.with_raw_response.create(
        model="fake-small", messages=messages
    )
    completion = raw.parse()

    # Then it gets a chat.completion whose job is in SQL at interactive priority
    assert completion.object == "chat.completion"
    assert completion.model == "fake-small"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == expected_reply("fake-small", messages)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    job = await service.store.get_job(raw.headers[JOB_ID_HEADER])
    assert job is not None and job.status == JobStatus.SUCCEEDED
    assert job.priority == Priority.INTERACTIVE and job.attempts == 1
    assert completion.id == f"chatcmpl-{job.id}"
    assert job.result == completion.choices[0].message.content
    assert job.completion_tokens == completion.usage.completion_tokens

    # And the sync client (in a thread: the server shares this event loop) gets the same
    def sync_call() -> str | None:
        sync = openai.OpenAI(base_url=base_url(api), api_key=key, max_retries=0)
        with sync:
            answer = sync.chat.completions.create(
                model="fake-large", messages=user("sync?"), temperature=0.5
            )
        return answer.choices[0].message.content

    assert await asyncio.to_thread(sync_call) == expected_reply("fake-large", user("sync?"))


async def test_streaming_relays_tokens_as_the_backend_sends_them_and_persists_the_text(
    client: openai.AsyncOpenAI,
    fake_llm: FakeLLM,
    start_worker: WorkerFactory,
    service: JobService,
) -> None:
    await start_worker()
    fake_llm.config.stream_chunk_delay_ms = 80  # the backend writes one word every 80 ms
    messages = user("stream me a few words please")
    expected = expected_reply("fake-small", messages)

    raw = await client.chat.completions.with_raw_response.create(
        model="fake-small",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    job_id = raw.headers[JOB_ID_HEADER]
    stream = raw.parse()
    pieces: list[str] = []
    status_at_first_piece = None
    finish_reasons = []
    usage = None
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                if status_at_first_piece is None:
                    job = await service.store.get_job(job_id)
                    assert job is not None
                    status_at_first_piece = job.status
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)

    # Then the text came in several pieces, the first while the job was still running
    assert "".join(pieces) == expected
    assert len(pieces) > 3
    assert status_at_first_piece == JobStatus.RUNNING
    assert finish_reasons == ["stop"]
    # And the whole text, with its usage, is stored
    job = await service.store.get_job(job_id)
    assert job is not None and job.status == JobStatus.SUCCEEDED and job.result == expected
    assert usage is not None and usage.completion_tokens == job.completion_tokens


async def test_errors_are_the_sdks_own_exceptions(
    sdk: SdkFactory, client: openai.AsyncOpenAI, start_worker: WorkerFactory, service: JobService
) -> None:
    await start_worker()
    # An unknown model is refused at submit with OpenAI's 404, listing the backend's models
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.chat.completions.create(model="no-such-model", messages=user("hi"))
    assert "fake-small" in unknown.value.message and "fake-large" in unknown.value.message
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"

    # A request the schema refuses is a 400
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="fake-small", messages=[])
    assert "messages" in bad.value.message

    # A request the backend rejects fails its job, and the backend's 400 comes back
    with pytest.raises(openai.BadRequestError) as rejected:
        await client.chat.completions.create(model="fake-small", messages=user("[[fake: 400]]"))
    job = await service.store.get_job(rejected.value.response.headers[JOB_ID_HEADER])
    assert job is not None and job.status == JobStatus.FAILED and job.attempts == 1
    assert rejected.value.response.headers["x-should-retry"] == "false"

    # A wrong key is an AuthenticationError in OpenAI's error shape
    stranger = sdk("pq_" + "x" * 43)
    with pytest.raises(openai.AuthenticationError) as denied:
        await stranger.models.list()
    body = denied.value.body
    assert isinstance(body, dict) and {"message", "type", "param", "code"} <= body.keys()
    assert body["type"] == "authentication_error"


async def test_models_are_the_backends_cached_briefly(
    client: openai.AsyncOpenAI, fake_llm: FakeLLM
) -> None:
    listed = await client.models.list()
    assert [m.id for m in listed.data] == fake_llm.config.models
    assert (await client.models.retrieve("fake-large")).id == "fake-large"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("fake-medium")


async def test_a_fallback_model_answers_when_the_model_is_unavailable(
    api: ApiClient, key: str, start_worker: WorkerFactory, service: JobService
) -> None:
    await start_worker()
    async with (
        aiohttp.ClientSession(headers=bearer(key)) as http,
        http.post(
            api.make_url("/v1/chat/completions"),
            json={
                "model": "fake-small",
                "messages": user("[[fake: 404, ok]] fall back"),
                "fallback_models": ["fake-large"],
            },
        ) as response,
    ):
        assert response.status == 200, await response.text()
        body = await response.json()
        job_id = response.headers[JOB_ID_HEADER]
    assert body["model"] == "fake-large"
    attempts = await service.store.list_attempts(job_id)
    assert [(a.model, a.outcome) for a in attempts] == [("fake-large", "succeeded")]


async def test_a_streamed_answer_from_a_fallback_model_names_it_in_every_chunk(
    client: openai.AsyncOpenAI, fake_llm: FakeLLM, start_worker: WorkerFactory
) -> None:
    await start_worker()
    fake_llm.config.stream_chunk_delay_ms = 20
    messages = user("[[fake: 404, ok]] stream from the fallback")

    stream = await client.chat.completions.create(
        model="fake-small",
        messages=messages,
        stream=True,
        extra_body={"fallback_models": ["fake-large"]},
    )
    chunks = [chunk async for chunk in stream]

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_reply("fake-large", messages)
    assert len(chunks) > 3 and {chunk.model for chunk in chunks} == {"fake-large"}


async def test_deterministic_requests_are_answered_from_the_cache_without_a_model_call(
    sdk: SdkFactory,
    client: openai.AsyncOpenAI,
    make_key: KeyFactory,
    fake_llm: FakeLLM,
    start_worker: WorkerFactory,
    service: JobService,
) -> None:
    await start_worker()
    messages = user("cache this")
    first = await client.chat.completions.with_raw_response.create(
        model="fake-small", messages=messages, temperature=0
    )
    calls = fake_llm.stats.total_requests
    assert calls == 1

    # When the same deterministic request comes again, the model is not called
    again = await client.chat.completions.with_raw_response.create(
        model="fake-small", messages=messages, temperature=0
    )
    assert fake_llm.stats.total_requests == calls
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    cached = await service.store.get_job(again.headers[JOB_ID_HEADER])
    assert cached is not None and cached.status == JobStatus.SUCCEEDED
    assert cached.cached_from == first.headers[JOB_ID_HEADER] and cached.attempts == 0

    # And a streamed request is answered from the cache too
    stream = await client.chat.completions.create(
        model="fake-small", messages=messages, temperature=0, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == first.parse().choices[0].message.content
    assert fake_llm.stats.total_requests == calls

    # But not with cache: false, nor for a non-deterministic request, nor for another key
    await client.chat.completions.create(
        model="fake-small", messages=messages, temperature=0, extra_body={"cache": False}
    )
    await client.chat.completions.create(model="fake-small", messages=messages)
    other = sdk(await make_key("other-tenant"))
    await other.chat.completions.create(model="fake-small", messages=messages, temperature=0)
    assert fake_llm.stats.total_requests == calls + 3

    # And cache: true asks for it without temperature 0
    await client.chat.completions.create(
        model="fake-small", messages=messages, extra_body={"cache": True}
    )
    assert fake_llm.stats.total_requests == calls + 3


async def test_the_cache_can_be_turned_off_globally(
    start_api: ApiStarter, sdk: SdkFactory, key: str, fake_llm: FakeLLM, start_worker: WorkerFactory
) -> None:
    await start_worker()
    api = await start_api(cache_enabled=False)
    client = sdk(key, api)
    for _ in range(2):
        await client.chat.completions.create(
            model="fake-small", messages=user("no cache"), seed=7, extra_body={"cache": True}
        )
    assert fake_llm.stats.total_requests == 2


async def test_twenty_concurrent_plain_aiohttp_posts_all_get_their_own_answer(
    api: ApiClient, key: str, start_worker: WorkerFactory
) -> None:
    await start_worker()
    url = api.make_url("/v1/chat/completions")

    async def ask(http: aiohttp.ClientSession, i: int) -> tuple[int, str]:
        body = {"model": "fake-small", "messages": user(f"question {i}")}
        async with http.post(url, json=body) as response:
            assert response.status == 200, await response.text()
            data = await response.json()
            return i, data["choices"][0]["message"]["content"]

    async with aiohttp.ClientSession(headers=bearer(key)) as http:
        answers = await asyncio.gather(*(ask(http, i) for i in range(20)))
    for i, content in answers:
        assert content == expected_reply("fake-small", user(f"question {i}"))


async def test_a_stream_cut_by_the_backend_resumes_on_retry_without_repeating_text(
    client: openai.AsyncOpenAI, start_worker: WorkerFactory, service: JobService
) -> None:
    await start_worker()
    # The backend sends two chunks, drops the connection, then answers in full on the retry
    messages = user("[[fake: stream_drop, ok]] cut short then whole")
    raw = await client.chat.completions.with_raw_response.create(
        model="fake-small", messages=messages, stream=True
    )
    stream = raw.parse()
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert text == expected_reply("fake-small", messages)
    job = await service.store.get_job(raw.headers[JOB_ID_HEADER])
    assert job is not None and job.attempts == 2 and job.result == text


async def test_models_and_the_model_check_follow_the_endpoint_table(
    start_api: ApiStarter, sdk: SdkFactory, key: str, fake_llm: FakeLLM
) -> None:
    # Given a second backend that serves the `two-*` models, and the default serving the rest
    async with FakeLLM(FakeLLMConfig(models=["two-a", "two-b", "stray"])) as second:
        table = [{"name": "second", "models": ["two-*"], "base_url": second.base_url}]
        api = await start_api(endpoints=json.dumps(table))
        client = sdk(key, api)

        # Then /v1/models lists each backend's own models
        listed = sorted(m.id for m in (await client.models.list()).data)
        assert listed == sorted([*fake_llm.config.models, "two-a", "two-b"])

        # And a model is checked against its own endpoint's list
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.chat.completions.create(model="two-c", messages=user("hi"))
        assert "two-a" in unknown.value.message and "fake-small" not in unknown.value.message
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="stray", messages=user("hi"))
