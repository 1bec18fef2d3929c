"""Tests for the scriptable fake OpenAI-compatible LLM server."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from promptq.testing import (
    FakeLLM,
    FakeLLMConfig,
    FakeLLMStats,
    count_tokens,
    expected_reply,
    serve,
)
from promptq.testing.fake_llm import exact_timer_loop

SHORT = aiohttp.ClientTimeout(total=0.3)


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    async with FakeLLM(FakeLLMConfig(seed=7)) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def payload(content: str, model: str = "fake-small", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def chat(
    http: aiohttp.ClientSession, llm: FakeLLM, body: Any, **kwargs: Any
) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(f"{llm.base_url}/chat/completions", data=data, **kwargs) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def sse_events(raw: bytes) -> list[str]:
    text = raw.decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: ") :] for e in events]


# ----------------------------------------------------------------------------- pure helpers


def test_count_tokens_and_expected_reply() -> None:
    assert count_tokens("  hello   big\nworld ") == 3
    assert count_tokens("") == 0
    msgs = [{"role": "user", "content": "first"}, {"role": "user", "content": "Hi  there\nfriend"}]
    reply = expected_reply("fake-small", msgs)
    assert reply.startswith("[fake-small] reply ") and reply.endswith(": Hi there friend")
    assert reply == expected_reply("fake-small", [{"role": "user", "content": "Hi  there\nfriend"}])
    assert reply != expected_reply("fake-large", msgs)
    assert reply != expected_reply("fake-small", [{"role": "user", "content": "Hi there friend"}])
    scripted = expected_reply("m", [{"role": "user", "content": "[[fake: 500, ok]] task 1"}])
    assert scripted.endswith(": task 1")
    assert scripted != expected_reply("m", [{"role": "user", "content": "task 1"}])


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        FakeLLMConfig(fail_rates={"bogus": 0.1})
    with pytest.raises(ValueError):
        FakeLLMConfig(fail_rates={"500": 0.6, "429": 0.6})
    with pytest.raises(ValueError):
        FakeLLMConfig(jitter=1.5)
    FakeLLMConfig(fail_rates={"429:retry_after=2": 0.5, "hang": 0.1})


# ----------------------------------------------------------------------------- success paths


@pytest.mark.asyncio
async def test_success_shape_usage_and_stats(llm: FakeLLM, http: aiohttp.ClientSession) -> None:
    messages = [
        {"role": "system", "content": "be terse"},
        {"role": "user", "content": "what is two plus two"},
    ]
    body = {"model": "fake-large", "messages": messages, "temperature": 0.2}
    status, headers, raw = await chat(http, llm, body, headers={"Authorization": "Bearer k1"})
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    data = json.loads(raw)
    assert data["id"].startswith("chatcmpl-") and data["object"] == "chat.completion"
    assert data["model"] == "fake-large" and isinstance(data["created"], int)
    reply = expected_reply("fake-large", messages)
    assert data["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": reply},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    prompt_tokens = (2 + 3) + (5 + 3)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": count_tokens(reply)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    assert data["usage"] == usage
    stats = llm.stats
    assert stats.total_requests == 1 and stats.requests_by_prompt == {"what is two plus two": 1}
    assert stats.responses_by_status == {200: 1} and stats.authorization_headers == {"Bearer k1"}
    assert stats.prompt_tokens_total == prompt_tokens
    assert stats.completion_tokens_total == usage["completion_tokens"]
    assert stats.in_flight == 0 and stats.peak_in_flight == 1 and len(stats.request_times) == 1


@pytest.mark.asyncio
async def test_max_tokens_truncates(llm: FakeLLM, http: aiohttp.ClientSession) -> None:
    status, _, raw = await chat(http, llm, payload("one two three four five", max_tokens=3))
    data = json.loads(raw)
    full = expected_reply("fake-small", payload("one two three four five")["messages"])
    assert status == 200 and data["choices"][0]["finish_reason"] == "length"
    assert data["choices"][0]["message"]["content"] == " ".join(full.split()[:3])
    assert data["usage"]["completion_tokens"] == 3


@pytest.mark.asyncio
async def test_content_parts_and_max_completion_tokens(
    llm: FakeLLM, http: aiohttp.ClientSession
) -> None:
    parts = [{"type": "text", "text": "look at"}, {"type": "image_url", "image_url": {}}]
    messages = [{"role": "user", "content": parts}]
    body = {"model": "m", "messages": messages, "max_completion_tokens": 2}
    status, _, raw = await chat(http, llm, body)
    choice = json.loads(raw)["choices"][0]
    assert status == 200 and choice["finish_reason"] == "length"
    assert choice["message"]["content"] == " ".join(expected_reply("m", messages).split()[:2])
    assert llm.stats.requests_by_prompt == {"look at": 1}


@pytest.mark.asyncio
async def test_models_endpoint(llm: FakeLLM, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{llm.base_url}/models") as resp:
        data = await resp.json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["fake-small", "fake-large"]
    assert all(m["object"] == "model" and m["owned_by"] == "fake" for m in data["data"])


@pytest.mark.asyncio
async def test_latency_and_sleep_step(http: aiohttp.ClientSession) -> None:
    async with FakeLLM(FakeLLMConfig(latency_ms=100)) as llm:
        start = time.monotonic()
        assert (await chat(http, llm, payload("slow")))[0] == 200
        assert time.monotonic() - start >= 0.09
        start = time.monotonic()
        assert (await chat(http, llm, payload("[[fake: sleep:150]] x")))[0] == 200
        assert time.monotonic() - start >= 0.14


# ----------------------------------------------------------------------------- scripted failures


@pytest.mark.asyncio
async def test_directive_progression(llm: FakeLLM, http: aiohttp.ClientSession) -> None:
    prompt = "[[fake: 500, 429:retry_after=1, ok]] summarise"
    results = [await chat(http, llm, payload(prompt)) for _ in range(4)]
    assert [r[0] for r in results] == [500, 429, 200, 200]
    assert json.loads(results[0][2])["error"]["type"] == "server_error"
    assert "Retry-After" not in results[0][1]
    assert results[1][1]["Retry-After"] == "1"
    error = json.loads(results[1][2])["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert error["message"].startswith("Rate limit reached")
    content = json.loads(results[3][2])["choices"][0]["message"]["content"]
    assert content == expected_reply("fake-small", payload(prompt)["messages"])
    assert llm.stats.requests_by_prompt == {prompt: 4}
    assert llm.stats.responses_by_status == {500: 1, 429: 1, 200: 2}


@pytest.mark.parametrize(
    ("step", "status", "err_type", "code"),
    [
        ("400", 400, "invalid_request_error", None),
        ("401", 401, "authentication_error", "invalid_api_key"),
        ("403", 403, "permission_error", None),
        ("404", 404, "invalid_request_error", "model_not_found"),
        ("408", 408, "timeout_error", None),
        ("409", 409, "conflict_error", None),
        ("422", 422, "invalid_request_error", None),
        ("500", 500, "server_error", None),
        ("502", 502, "server_error", None),
        ("503", 503, "server_error", None),
        ("504", 504, "server_error", None),
        ("context", 400, "invalid_request_error", "context_length_exceeded"),
    ],
)
@pytest.mark.asyncio
async def test_error_steps(
    llm: FakeLLM,
    http: aiohttp.ClientSession,
    step: str,
    status: int,
    err_type: str,
    code: str | None,
) -> None:
    got, headers, raw = await chat(http, llm, payload(f"[[fake: {step}]] hi"))
    error = json.loads(raw)["error"]
    assert got == status and headers["Content-Type"].startswith("application/json")
    assert error["type"] == err_type and error["code"] == code and error["message"]
    if step == "context":
        assert error["message"].startswith("This model's maximum context length is")


@pytest.mark.asyncio
async def test_retry_after_variants(llm: FakeLLM, http: aiohttp.ClientSession) -> None:
    _, headers, _ = await chat(http, llm, payload("[[fake: 429]] a"))
    assert "Retry-After" not in headers and "retry-after-ms" not in headers
    _, headers, _ = await chat(http, llm, payload("[[fake: 429:retry_after=0.5]] b"))
    assert headers["Retry-After"] == "0.5"
    _, headers, _ = await chat(http, llm, payload("[[fake: 429:retry_after_ms=250]] c"))
    assert headers["retry-after-ms"] == "250" and "Retry-After" not in headers
    status, headers, _ = await chat(http, llm, payload("[[fake: 503:retry_after=2]] d"))
    assert status == 503 and headers["Retry-After"] == "2"


@pytest.mark.asyncio
async def test_unknown_step_is_400(llm: FakeLLM, http: aiohttp.ClientSession) -> None:
    for prompt in ("[[fake: teapot]] x", "[[fake: sleep:abc]] x", "[[fake: 429:wait=1]] x"):
        status, _, raw = await chat(http, llm, payload(prompt))
        assert status == 400 and "fake step" in json.loads(raw)["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", {"messages": [{"role": "user", "content": "x"}]}, {"model": "m"}],
)
@pytest.mark.asyncio
async def test_invalid_request_body(llm: FakeLLM, http: aiohttp.ClientSession, body: Any) -> None:
    status, _, raw = await chat(http, llm, body)
    assert status == 400
    error = json.loads(raw)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None
    assert error["code"] is None
    assert llm.stats.total_requests == 1 and llm.stats.requests_by_prompt == {}


@pytest.mark.asyncio
async def test_malformed_empty_nochoices(llm: FakeLLM, http: aiohttp.ClientSession) -> None:
    status, headers, raw = await chat(http, llm, payload("[[fake: malformed]] a"))
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert raw == b'{"id": "chatcmpl-x", "choices": ['
    with pytest.raises(ValueError):
        json.loads(raw)
    status, _, raw = await chat(http, llm, payload("[[fake: empty]] b"))
    assert status == 200 and raw == b""
    status, _, raw = await chat(http, llm, payload("[[fake: nochoices]] c"))
    data = json.loads(raw)
    assert status == 200 and "choices" not in data and data["object"] == "chat.completion"


@pytest.mark.asyncio
async def test_drop_closes_connection(llm: FakeLLM, http: aiohttp.ClientSession) -> None:
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await chat(http, llm, payload("[[fake: drop, ok]] a"))
    assert (await chat(http, llm, payload("[[fake: drop, ok]] a")))[0] == 200
    stats = llm.stats
    assert stats.total_requests == 2 and stats.responses_by_status == {0: 1, 200: 1}
    assert stats.in_flight == 0


@pytest.mark.asyncio
async def test_hang_times_out_client_and_is_released(http: aiohttp.ClientSession) -> None:
    llm = FakeLLM()
    async with llm:
        with pytest.raises(TimeoutError):
            await chat(http, llm, payload("[[fake: hang]] a"), timeout=SHORT)
        assert llm.stats.total_requests == 1
        started = time.monotonic()
    assert time.monotonic() - started < 2.0
    assert llm.stats.in_flight == 0


@pytest.mark.asyncio
async def test_hang_released_by_shutdown(http: aiohttp.ClientSession) -> None:
    llm = FakeLLM()
    async with llm:
        task = asyncio.create_task(chat(http, llm, payload("[[fake: hang]] a")))
        await llm.wait_for_requests(1)
        assert llm.stats.in_flight == 1
    with pytest.raises(aiohttp.ClientConnectionError):
        await task
    assert llm.stats.in_flight == 0


@pytest.mark.asyncio
async def test_hang_s_elapses_into_success(http: aiohttp.ClientSession) -> None:
    async with FakeLLM(FakeLLMConfig(hang_s=0.05)) as llm:
        status, _, raw = await chat(http, llm, payload("[[fake: hang]] a"), timeout=SHORT)
    assert status == 200 and json.loads(raw)["choices"][0]["finish_reason"] == "stop"


# ----------------------------------------------------------------------------- streaming


@pytest.mark.asyncio
async def test_streaming_reassembles_reply(llm: FakeLLM, http: aiohttp.ClientSession) -> None:
    body = payload("stream me  please", stream=True, stream_options={"include_usage": True})
    status, headers, raw = await chat(http, llm, body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    reply = expected_reply("fake-small", body["messages"])
    content_chunks = chunks[1:-2]
    assert len(content_chunks) == len(reply.split())
    assert "".join(c["choices"][0]["delta"]["content"] for c in content_chunks) == reply
    assert chunks[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == count_tokens(reply)
    assert chunks[-1]["usage"]["prompt_tokens"] == 3 + 3
    assert llm.stats.completion_tokens_total == count_tokens(reply)


@pytest.mark.asyncio
async def test_streaming_without_usage_and_truncated(
    llm: FakeLLM, http: aiohttp.ClientSession
) -> None:
    _, _, raw = await chat(http, llm, payload("a b c d", stream=True, max_tokens=2))
    chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert all(c["choices"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == " ".join(
        expected_reply("fake-small", payload("a b c d")["messages"]).split()[:2]
    )


@pytest.mark.asyncio
async def test_stream_drop(llm: FakeLLM, http: aiohttp.ClientSession) -> None:
    lines: list[bytes] = []
    data = json.dumps(payload("[[fake: stream_drop]] x", stream=True))
    async with http.post(f"{llm.base_url}/chat/completions", data=data) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in resp.content:
                lines.append(line)
    events = [line for line in lines if line.startswith(b"data: ")]
    assert len(events) == 2 and b"[DONE]" not in b"".join(lines)
    assert llm.stats.in_flight == 0 and llm.stats.responses_by_status == {0: 1}


# ----------------------------------------------------------------------------- load behaviour


@pytest.mark.asyncio
async def test_capacity_and_peak_in_flight(http: aiohttp.ClientSession) -> None:
    llm = FakeLLM(FakeLLMConfig(capacity=3))
    async with llm:
        tasks = [
            asyncio.create_task(chat(http, llm, payload(f"[[fake: hang]] {i}"))) for i in range(3)
        ]
        await llm.wait_for_requests(3)
        assert llm.stats.in_flight == 3
        status, headers, raw = await chat(http, llm, payload("[[fake: ok]] extra"))
        assert status == 429 and headers["Retry-After"] == "1"
        assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
        # The rejected request did not consume its scripted step.
        assert (await chat(http, llm, payload("[[fake: ok]] nope"), timeout=SHORT))[0] == 429
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, aiohttp.ClientConnectionError) for r in results)
    assert llm.stats.peak_in_flight == 3 and llm.stats.in_flight == 0
    assert llm.stats.total_requests == 5 and llm.stats.responses_by_status == {429: 2, 0: 3}


@pytest.mark.asyncio
async def test_fail_rates(http: aiohttp.ClientSession) -> None:
    async with FakeLLM(FakeLLMConfig(seed=3, fail_rates={"500": 0.5})) as llm:
        statuses = [(await chat(http, llm, payload(f"p{i}")))[0] for i in range(40)]
        assert set(statuses) == {200, 500}
        # A directive always wins over random failures.
        assert (await chat(http, llm, payload("[[fake: ok]] p")))[0] == 200
    async with FakeLLM(FakeLLMConfig(seed=3, fail_rates={"500": 0.5})) as again:
        assert [(await chat(http, again, payload(f"p{i}")))[0] for i in range(40)] == statuses


@pytest.mark.asyncio
async def test_wait_for_requests(llm: FakeLLM, http: aiohttp.ClientSession) -> None:
    with pytest.raises(TimeoutError):
        await llm.wait_for_requests(1, timeout_s=0.05)
    waiter = asyncio.create_task(llm.wait_for_requests(2, timeout_s=5))
    await chat(http, llm, payload("a"))
    assert not waiter.done()
    await chat(http, llm, payload("b"))
    await waiter


# ----------------------------------------------------------------------------- control endpoints


@pytest.mark.asyncio
async def test_stats_reset_and_config_endpoints(llm: FakeLLM, http: aiohttp.ClientSession) -> None:
    prompt = "[[fake: 500, ok]] x"
    await chat(http, llm, payload(prompt), headers={"Authorization": "Bearer b"})
    await chat(http, llm, payload(prompt), headers={"Authorization": "Bearer a"})
    async with http.get(f"{llm.url}/_fake/stats") as resp:
        stats = await resp.json()
    assert stats == json.loads(json.dumps(llm.stats.to_dict()))
    assert stats["authorization_headers"] == ["Bearer a", "Bearer b"]
    assert stats["responses_by_status"] == {"200": 1, "500": 1}
    assert stats["requests_by_prompt"] == {prompt: 2} and stats["total_requests"] == 2

    async with http.post(f"{llm.url}/_fake/reset") as resp:
        assert resp.status == 200
    assert llm.stats.total_requests == 0 and llm.stats.requests_by_prompt == {}
    assert (await chat(http, llm, payload(prompt)))[0] == 500  # script restarted
    llm.reset()
    assert llm.stats.to_dict()["responses_by_status"] == {}
    assert (await chat(http, llm, payload(prompt)))[0] == 500

    update = {"latency_ms": 1, "fail_rates": {"429:retry_after=3": 1.0}, "capacity": 10, "seed": 1}
    async with http.post(f"{llm.url}/_fake/config", json=update) as resp:
        assert resp.status == 200 and (await resp.json())["capacity"] == 10
    assert llm.config.fail_rates == {"429:retry_after=3": 1.0} and llm.config.latency_ms == 1.0
    status, headers, _ = await chat(http, llm, payload("no directive"))
    assert status == 429 and headers["Retry-After"] == "3"
    async with http.get(f"{llm.url}/_fake/config") as resp:
        assert (await resp.json())["seed"] == 1


@pytest.mark.parametrize(
    "body",
    [
        b"{oops",
        b"[1]",
        b'{"latency_ms": -1}',
        b'{"latency_ms": "fast"}',
        b'{"jitter": 2}',
        b'{"fail_rates": {"bogus": 0.5}}',
        b'{"fail_rates": {"500": 0.7, "429": 0.7}}',
        b'{"fail_rates": [1]}',
        b'{"capacity": 0}',
        b'{"capacity": true}',
        b'{"models": []}',
        b'{"unknown_field": 1}',
    ],
)
@pytest.mark.asyncio
async def test_config_endpoint_rejects_bad_input(
    llm: FakeLLM, http: aiohttp.ClientSession, body: bytes
) -> None:
    before = dict(vars(llm.config))
    async with http.post(f"{llm.url}/_fake/config", data=body) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert vars(llm.config) == before


# ----------------------------------------------------------------------------- real clients


@pytest.mark.asyncio
async def test_openai_client(llm: FakeLLM) -> None:
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=llm.base_url, api_key="sk-test", max_retries=0)
    try:
        messages = [{"role": "user", "content": "hello from openai"}]
        completion = await client.chat.completions.create(model="fake-small", messages=messages)
        assert completion.choices[0].message.content == expected_reply("fake-small", messages)
        assert completion.usage is not None and completion.usage.prompt_tokens == 3 + 3

        stream = await client.chat.completions.create(
            model="fake-large",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        assert "".join(parts) == expected_reply("fake-large", messages)

        limited = [{"role": "user", "content": "[[fake: 429:retry_after=1]] x"}]
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="fake-small", messages=limited)
    finally:
        await client.close()
    assert llm.stats.authorization_headers == {"Bearer sk-test"}


@pytest.mark.asyncio
async def test_serve_runs_until_cancelled(http: aiohttp.ClientSession) -> None:
    listening = asyncio.Event()
    urls: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "listening" in record.getMessage():
                urls.append(str(record.args[0]) if isinstance(record.args, tuple) else "")
                listening.set()

    logger = logging.getLogger("promptq.testing.fake_llm")
    handler, old_level = Catch(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    task = asyncio.create_task(serve("127.0.0.1", 0, FakeLLMConfig()))
    try:
        await asyncio.wait_for(listening.wait(), 5)
        async with http.get(f"{urls[0]}/models") as resp:
            assert resp.status == 200
    finally:
        task.cancel()
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    with pytest.raises(asyncio.CancelledError):
        await task


def test_the_exact_latency_loop_serves_and_records_each_call_in_flight() -> None:
    # `promptq fake-llm` runs on this loop (select(2) timers, not epoll's whole milliseconds).
    async def one_call() -> tuple[FakeLLMStats, float]:
        async with FakeLLM(FakeLLMConfig(latency_ms=20)) as llm, aiohttp.ClientSession() as http:
            started = time.monotonic()
            async with http.post(f"{llm.base_url}/chat/completions", json=payload("hi")) as resp:
                assert resp.status == 200
                await resp.read()
            return llm.stats, time.monotonic() - started

    with asyncio.Runner(loop_factory=exact_timer_loop) as runner:
        assert isinstance(runner.get_loop(), asyncio.SelectorEventLoop)
        stats, took_s = runner.run(one_call())
    [(start, end)] = stats.spans
    assert end - start >= 0.020 and took_s >= 0.020  # never early
    assert stats.busy_ms_total == pytest.approx((end - start) * 1000)
