"""Input limits: each over-limit request gets a clear 4xx in the one error shape, and creates
nothing; a request exactly at a limit is accepted.

Given the real API app with small limits, when clients send bodies that are too large, jobs with
too many messages or characters, or parameters out of range, then each gets 413 or 422 naming
what to change, and no job is stored.
"""

from __future__ import annotations

from typing import Any

import pytest

from promptq.input_limits import text_chars
from promptq.service import JobService
from tests.conftest import ApiClient, ApiStarter, KeyFactory, bearer


def prompt(*contents: str, **extra: Any) -> dict[str, Any]:
    """A prompt job request with one user message per content."""
    return {
        "kind": "prompt",
        "messages": [{"role": "user", "content": c} for c in contents],
        **extra,
    }


async def post(api: ApiClient, key: str, **kw: Any) -> tuple[int, str, dict[str, Any]]:
    """POST /api/jobs; (status, content type, JSON body)."""
    async with api.post("/api/jobs", headers=bearer(key), **kw) as response:
        return response.status, response.content_type, await response.json()


@pytest.fixture
async def api(start_api: ApiStarter) -> ApiClient:
    """The API with small limits, so tests stay small."""
    return await start_api(api_max_body_bytes=4096, max_messages_per_job=3, max_message_chars=1000)


async def test_a_body_over_the_limit_is_413_in_the_error_shape(
    api: ApiClient, make_key: KeyFactory, service: JobService
) -> None:
    key = await make_key("big")
    status, content_type, body = await post(
        api, key, data=b'{"kind": "prompt", "messages": [' + b" " * 5000 + b"]}"
    )
    assert (status, content_type) == (413, "application/json")
    assert body["error"]["code"] == "request_entity_too_large"
    assert "PROMPTQ_API_MAX_BODY_BYTES" in body["error"]["message"]
    assert await service.store.list_jobs() == []


async def test_messages_per_job_and_message_characters_are_capped(
    api: ApiClient, make_key: KeyFactory, service: JobService
) -> None:
    key = await make_key("chatty")
    # At the limits: accepted
    status, _, body = await post(api, key, json=prompt("a", "b", "c"))
    assert status == 202, body
    exact = 1000 - text_chars([{"role": "user", "content": ""}])
    status, _, body = await post(api, key, json=prompt("y" * exact))
    assert status == 202, body
    accepted = len(await service.store.list_jobs())

    # Over them: 413, naming the setting, and nothing stored
    cases = {
        "PROMPTQ_MAX_MESSAGES_PER_JOB": prompt("a", "b", "c", "d"),
        "PROMPTQ_MAX_MESSAGE_CHARS": prompt("y" * (exact + 1)),
    }
    for setting, request in cases.items():
        status, content_type, body = await post(api, key, json=request)
        assert (status, content_type) == (413, "application/json"), setting
        assert body["error"]["code"] == "limit_exceeded"
        assert setting in body["error"]["message"]
    assert len(await service.store.list_jobs()) == accepted


@pytest.mark.parametrize(
    ("field", "params"),
    [
        ("temperature", {"temperature": 2.5}),
        ("temperature", {"temperature": -0.1}),
        ("top_p", {"top_p": 1.5}),
        ("max_tokens", {"max_tokens": 0}),
        ("max_tokens", {"max_tokens": 1_000_001}),
        ("seed", {"seed": 2**64}),
        ("stop", {"stop": ["a", "b", "c", "d", "e"]}),
        ("unknown", {"unknown": 1}),
    ],
)
async def test_parameters_out_of_range_are_422(
    field: str, params: dict[str, Any], api: ApiClient, make_key: KeyFactory
) -> None:
    key = await make_key("ranges")
    status, content_type, body = await post(api, key, json=prompt("hi", params=params))
    assert (status, content_type) == (422, "application/json"), body
    assert body["error"]["code"] == "invalid_request"
    assert field in body["error"]["message"]


@pytest.mark.parametrize(
    "extra",
    [
        {"max_attempts": 0},
        {"max_attempts": 101},
        {"deadline_s": 0},
        {"model": ""},
        {"model": "m" * 256},
        {"idempotency_key": "k" * 256},
    ],
)
async def test_job_options_out_of_range_are_422(
    extra: dict[str, Any], api: ApiClient, make_key: KeyFactory, service: JobService
) -> None:
    key = await make_key("options")
    status, _, body = await post(api, key, json=prompt("hi", **extra))
    assert status == 422, body
    assert next(iter(extra)) in body["error"]["message"]
    assert await service.store.list_jobs() == []


async def test_openai_chat_completions_are_capped_too(
    api: ApiClient, make_key: KeyFactory, service: JobService
) -> None:
    key = await make_key("openai")
    body = {"model": "fake-small", "messages": prompt("a", "b", "c", "d")["messages"]}
    async with api.post("/v1/chat/completions", json=body, headers=bearer(key)) as response:
        assert response.status == 413
        error = (await response.json())["error"]
    assert "PROMPTQ_MAX_MESSAGES_PER_JOB" in error["message"]
    assert error["type"] == "invalid_request_error"  # OpenAI's shape under /v1
    assert await service.store.list_jobs() == []
