"""worker.llm.LLMClient over real HTTP against the fake OpenAI-compatible server.

Given a scripted step in the last user message, when the client calls the endpoint, then it
returns a Completion or raises TransientLLMError / PermanentLLMError with the right status code
and Retry-After, and never leaks the API key into an error message.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from promptq.errors import LLMError, PermanentLLMError, TransientLLMError
from promptq.testing.fake_llm import FakeLLM, count_tokens, expected_reply
from worker.llm import Completion, LLMClient

MODEL = "fake-small"
API_KEY = "sk-test-0123456789abcdef-SECRET"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def make_client(
    http: aiohttp.ClientSession,
    base_url: str,
    *,
    api_key: str | None = API_KEY,
    timeout_s: float = 5.0,
) -> LLMClient:
    return LLMClient(http, base_url=base_url, api_key=api_key, timeout_s=timeout_s)


def user(content: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


async def call(client: LLMClient, content: str, **params: Any) -> Completion:
    return await client.chat(MODEL, user(content), params)


async def expect_error(client: LLMClient, content: str, **params: Any) -> LLMError:
    with pytest.raises(LLMError) as info:
        await call(client, content, **params)
    return info.value


# ----------------------------------------------------------------------------- success


async def test_success_returns_the_completion_and_usage(
    http: aiohttp.ClientSession, fake_llm: FakeLLM
) -> None:
    client = make_client(http, fake_llm.base_url)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "name three rivers in Europe"},
    ]

    completion = await client.chat(MODEL, messages, {})

    assert completion.content == expected_reply(MODEL, messages)
    assert completion.finish_reason == "stop"
    assert completion.model == MODEL
    assert completion.prompt_tokens is not None and completion.prompt_tokens > 0
    assert completion.completion_tokens is not None and completion.completion_tokens > 0
    assert completion.prompt_tokens == fake_llm.stats.prompt_tokens_total
    assert completion.completion_tokens == fake_llm.stats.completion_tokens_total
    # The fake counts words, plus 3 per message for the prompt.
    assert completion.prompt_tokens == sum(count_tokens(m["content"]) + 3 for m in messages)
    assert completion.completion_tokens == count_tokens(completion.content)
    assert fake_llm.stats.total_requests == 1


async def test_params_are_sent_and_max_tokens_truncates(
    http: aiohttp.ClientSession, fake_llm: FakeLLM
) -> None:
    client = make_client(http, fake_llm.base_url)
    content = "write a long story about a lighthouse keeper"

    completion = await call(client, content, max_tokens=2)

    assert completion.finish_reason == "length"
    assert completion.content == " ".join(expected_reply(MODEL, user(content)).split()[:2])
    assert completion.completion_tokens == 2 == fake_llm.stats.completion_tokens_total


async def test_scripted_ok_after_sleep_succeeds(
    http: aiohttp.ClientSession, fake_llm: FakeLLM
) -> None:
    client = make_client(http, fake_llm.base_url)
    content = "[[fake: sleep:50]] hello there"

    completion = await call(client, content)

    assert completion.content == expected_reply(MODEL, user(content))
    assert completion.finish_reason == "stop"


async def test_api_key_is_sent_as_bearer_token(
    http: aiohttp.ClientSession, fake_llm: FakeLLM
) -> None:
    await call(make_client(http, fake_llm.base_url), "hi")
    assert fake_llm.stats.authorization_headers == {f"Bearer {API_KEY}"}


async def test_no_api_key_sends_no_authorization_header(
    http: aiohttp.ClientSession, fake_llm: FakeLLM
) -> None:
    completion = await call(make_client(http, fake_llm.base_url, api_key=None), "hi")
    assert completion.content == expected_reply(MODEL, user("hi"))
    assert fake_llm.stats.total_requests == 1
    assert fake_llm.stats.authorization_headers == set()


async def test_trailing_slash_in_base_url_is_tolerated(
    http: aiohttp.ClientSession, fake_llm: FakeLLM
) -> None:
    completion = await call(make_client(http, fake_llm.base_url + "/"), "slash")
    assert completion.content == expected_reply(MODEL, user("slash"))


# ----------------------------------------------------------------------------- HTTP errors


@pytest.mark.parametrize("status", [408, 409, 500, 502, 503, 504])
async def test_retryable_statuses_are_transient(
    http: aiohttp.ClientSession, fake_llm: FakeLLM, status: int
) -> None:
    error = await expect_error(make_client(http, fake_llm.base_url), f"[[fake: {status}]] x")

    assert type(error) is TransientLLMError
    assert error.status_code == status
    assert error.retry_after_s is None
    assert f"HTTP {status}" in error.message
    assert "(simulated)" in error.message  # the server's own error message is kept


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_client_errors_are_permanent(
    http: aiohttp.ClientSession, fake_llm: FakeLLM, status: int
) -> None:
    error = await expect_error(make_client(http, fake_llm.base_url), f"[[fake: {status}]] x")

    assert type(error) is PermanentLLMError
    assert error.status_code == status
    assert error.retry_after_s is None
    assert f"HTTP {status}" in error.message


async def test_rate_limit_carries_retry_after_seconds(
    http: aiohttp.ClientSession, fake_llm: FakeLLM
) -> None:
    client = make_client(http, fake_llm.base_url)
    error = await expect_error(client, "[[fake: 429:retry_after=2]] x")

    assert type(error) is TransientLLMError
    assert error.status_code == 429
    assert error.retry_after_s == 2.0
    assert "Rate limit reached" in error.message


async def test_rate_limit_carries_retry_after_ms(
    http: aiohttp.ClientSession, fake_llm: FakeLLM
) -> None:
    client = make_client(http, fake_llm.base_url)
    error = await expect_error(client, "[[fake: 429:retry_after_ms=1500]] x")

    assert type(error) is TransientLLMError
    assert error.status_code == 429
    assert error.retry_after_s == 1.5


async def test_retry_after_ms_beats_retry_after_over_http(
    http: aiohttp.ClientSession, fake_llm: FakeLLM
) -> None:
    client = make_client(http, fake_llm.base_url)
    error = await expect_error(client, "[[fake: 503:retry_after=9;retry_after_ms=250]] x")

    assert type(error) is TransientLLMError
    assert error.status_code == 503
    assert error.retry_after_s == 0.25


async def test_rate_limit_without_retry_after(
    http: aiohttp.ClientSession, fake_llm: FakeLLM
) -> None:
    error = await expect_error(make_client(http, fake_llm.base_url), "[[fake: 429]] x")
    assert type(error) is TransientLLMError
    assert error.status_code == 429
    assert error.retry_after_s is None


async def test_context_length_is_permanent(http: aiohttp.ClientSession, fake_llm: FakeLLM) -> None:
    error = await expect_error(make_client(http, fake_llm.base_url), "[[fake: context]] x")

    assert type(error) is PermanentLLMError
    assert error.status_code == 400
    assert "context length" in error.message


async def test_scripted_sequence_is_classified_step_by_step(
    http: aiohttp.ClientSession, fake_llm: FakeLLM
) -> None:
    client = make_client(http, fake_llm.base_url)
    content = "[[fake: 500, 429:retry_after=1, ok]] again and again"

    first = await expect_error(client, content)
    second = await expect_error(client, content)
    third = await call(client, content)

    assert (type(first), first.status_code) == (TransientLLMError, 500)
    assert (type(second), second.status_code, second.retry_after_s) == (TransientLLMError, 429, 1.0)
    assert third.content == expected_reply(MODEL, user(content))
    assert fake_llm.stats.requests_by_prompt[content] == 3


# ----------------------------------------------------------------------------- the API key


async def test_401_message_does_not_contain_the_key(
    http: aiohttp.ClientSession, fake_llm: FakeLLM
) -> None:
    error = await expect_error(make_client(http, fake_llm.base_url), "[[fake: 401]] x")

    assert type(error) is PermanentLLMError
    assert error.status_code == 401
    assert "Incorrect API key" in error.message
    assert API_KEY not in error.message
    assert API_KEY not in str(error) and API_KEY not in repr(error)
    assert fake_llm.stats.authorization_headers == {f"Bearer {API_KEY}"}


async def test_key_echoed_by_the_server_is_scrubbed(
    http: aiohttp.ClientSession, fake_llm: FakeLLM
) -> None:
    # The fake's 404 message names the requested model; asking for a "model" that contains the
    # key makes the server echo the key back, which is what the client's scrubbing is for.
    client = make_client(http, fake_llm.base_url)
    with pytest.raises(PermanentLLMError) as info:
        await client.chat(f"model-{API_KEY}", user("[[fake: 404]] x"), {})

    error = info.value
    assert error.status_code == 404
    assert "model-***" in error.message
    assert API_KEY not in str(error) and API_KEY not in repr(error)


async def test_key_in_a_rejected_request_is_scrubbed(
    http: aiohttp.ClientSession, fake_llm: FakeLLM
) -> None:
    # An invalid fake step is echoed back in the fake's 400 message.
    error = await expect_error(make_client(http, fake_llm.base_url), f"[[fake: {API_KEY}]] x")

    assert type(error) is PermanentLLMError
    assert error.status_code == 400
    assert "***" in error.message
    assert API_KEY not in str(error)


# ----------------------------------------------------------------------------- transport failures


async def test_hang_times_out_as_transient(http: aiohttp.ClientSession, fake_llm: FakeLLM) -> None:
    client = make_client(http, fake_llm.base_url, timeout_s=0.3)
    error = await expect_error(client, "[[fake: hang]] x")

    assert type(error) is TransientLLMError
    assert error.status_code is None
    assert "did not answer within 0.3 s" in error.message
    assert fake_llm.stats.total_requests == 1


async def test_slow_answer_within_the_timeout_succeeds(
    http: aiohttp.ClientSession, fake_llm: FakeLLM
) -> None:
    client = make_client(http, fake_llm.base_url, timeout_s=2.0)
    completion = await call(client, "[[fake: sleep:100]] patience")
    assert completion.finish_reason == "stop"


async def test_dropped_connection_is_transient(
    http: aiohttp.ClientSession, fake_llm: FakeLLM
) -> None:
    error = await expect_error(make_client(http, fake_llm.base_url), "[[fake: drop]] x")

    assert type(error) is TransientLLMError
    assert error.status_code is None
    assert "connection to the model endpoint failed" in error.message
    assert fake_llm.stats.responses_by_status.get(0) == 1  # the fake really dropped it


@pytest.mark.parametrize(
    ("step", "fragment"),
    [
        ("malformed", "malformed body"),
        ("empty", "empty body"),
        ("nochoices", "malformed body"),
    ],
)
async def test_bad_success_bodies_are_transient(
    http: aiohttp.ClientSession, fake_llm: FakeLLM, step: str, fragment: str
) -> None:
    error = await expect_error(make_client(http, fake_llm.base_url), f"[[fake: {step}]] x")

    assert type(error) is TransientLLMError
    assert error.status_code == 200
    assert fragment in error.message
    assert fake_llm.stats.responses_by_status == {200: 1}


async def test_connection_refused_is_transient(http: aiohttp.ClientSession) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The port was free a moment ago and nothing listens on it now.
    client = make_client(http, f"http://127.0.0.1:{port}/v1", timeout_s=2.0)

    error = await expect_error(client, "anyone home?")

    assert type(error) is TransientLLMError
    assert error.status_code is None
    assert "connection to the model endpoint failed" in error.message
    assert API_KEY not in error.message


# ----------------------------------------------------------------------------- odd endpoints
# Real HTTP responses the fake never sends, from a tiny aiohttp app on an ephemeral port: each
# request's last user message names the canned response to send.

ODD_RESPONSES: dict[str, tuple[int, bytes, dict[str, str]]] = {
    "usage-is-a-list": (
        200,
        b'{"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}], "usage": [1]}',
        {},
    ),
    "odd-field-types": (
        200,
        b'{"choices": [{"message": {"content": "hi"}, "finish_reason": 5}], "model": 7,'
        b' "usage": {"prompt_tokens": "3", "completion_tokens": true}}',
        {},
    ),
    "usage-out-of-range": (
        200,
        b'{"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],'
        b' "usage": {"prompt_tokens": 99999999999, "completion_tokens": -4}}',
        {},
    ),
    "null-content": (200, b'{"choices": [{"message": {"content": null}}]}', {}),
    "body-is-a-list": (200, b"[1, 2]", {}),
    "malformed-echoing-key": (200, f'{{"oops": "{API_KEY}"'.encode(), {}),
    "plain-text-error": (502, b"<html>Bad Gateway</html>", {}),
    "string-error": (400, b'{"error": "model is required"}', {}),
    "teapot": (418, b'{"error": {"message": "short and stout"}}', {}),
    "http-date": (503, b"{}", {"Retry-After": "Wed, 01 Jan 2200 00:00:00 GMT"}),
    "past-http-date": (429, b"{}", {"Retry-After": "Mon, 01 Jan 2001 00:00:00 GMT"}),
}


@pytest.fixture
async def odd_base_url() -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        status, raw, headers = ODD_RESPONSES[body["messages"][-1]["content"]]
        return web.Response(
            status=status, body=raw, headers=headers, content_type="application/json"
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


async def test_odd_usage_does_not_discard_a_good_answer(
    http: aiohttp.ClientSession, odd_base_url: str
) -> None:
    completion = await call(make_client(http, odd_base_url), "usage-is-a-list")
    assert completion == Completion("hi", "stop", None, None, None)


async def test_wrongly_typed_metadata_is_dropped(
    http: aiohttp.ClientSession, odd_base_url: str
) -> None:
    completion = await call(make_client(http, odd_base_url), "odd-field-types")
    assert completion == Completion("hi", None, None, None, None)


async def test_token_counts_that_cannot_be_are_dropped(
    http: aiohttp.ClientSession, odd_base_url: str
) -> None:
    # (Negative, or too big for the jobs table's INTEGER columns: PostgreSQL would refuse it.)
    completion = await call(make_client(http, odd_base_url), "usage-out-of-range")
    assert completion == Completion("hi", "stop", None, None, None)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("null-content", "no text content"), ("body-is-a-list", "malformed body")],
)
async def test_unusable_success_bodies_are_transient(
    http: aiohttp.ClientSession, odd_base_url: str, name: str, fragment: str
) -> None:
    error = await expect_error(make_client(http, odd_base_url), name)
    assert type(error) is TransientLLMError
    assert error.status_code == 200
    assert fragment in error.message


async def test_malformed_body_echoing_the_key_is_scrubbed(
    http: aiohttp.ClientSession, odd_base_url: str
) -> None:
    error = await expect_error(make_client(http, odd_base_url), "malformed-echoing-key")
    assert type(error) is TransientLLMError
    assert "malformed body" in error.message and "***" in error.message
    assert API_KEY not in str(error)


async def test_non_json_error_body_is_quoted(
    http: aiohttp.ClientSession, odd_base_url: str
) -> None:
    error = await expect_error(make_client(http, odd_base_url), "plain-text-error")
    assert type(error) is TransientLLMError
    assert error.status_code == 502
    assert "<html>Bad Gateway</html>" in error.message


async def test_string_error_and_unknown_4xx(http: aiohttp.ClientSession, odd_base_url: str) -> None:
    client = make_client(http, odd_base_url)
    error = await expect_error(client, "string-error")
    assert (type(error), error.status_code) == (PermanentLLMError, 400)
    assert error.message.endswith("model is required")

    error = await expect_error(client, "teapot")
    assert (type(error), error.status_code) == (PermanentLLMError, 418)
    assert error.message.endswith("short and stout")


async def test_retry_after_http_dates_over_http(
    http: aiohttp.ClientSession, odd_base_url: str
) -> None:
    client = make_client(http, odd_base_url)
    future = await expect_error(client, "http-date")
    assert (type(future), future.status_code) == (TransientLLMError, 503)
    assert future.retry_after_s is not None and future.retry_after_s > 365 * 24 * 3600

    past = await expect_error(client, "past-http-date")
    assert (type(past), past.status_code, past.retry_after_s) == (TransientLLMError, 429, 0.0)
