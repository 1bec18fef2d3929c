"""worker.routing.ModelRouter over real HTTP: each model's calls reach its own endpoint with
that endpoint's key, and nothing else."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from promptq.endpoints import load_endpoints
from promptq.settings import Settings
from promptq.testing.fake_llm import FakeLLM, expected_reply
from worker.limiter import estimate_tokens
from worker.routing import ModelRouter


@pytest.fixture
async def second_llm() -> AsyncIterator[FakeLLM]:
    async with FakeLLM() as llm:
        yield llm


async def test_calls_go_to_the_endpoint_of_their_model_with_its_key(
    fake_llm: FakeLLM, second_llm: FakeLLM
) -> None:
    config = [
        {
            "name": "first",
            "models": ["one-*"],
            "base_url": fake_llm.base_url,
            "api_key_env": "FIRST_KEY",
        },
        {"name": "second", "models": ["two-*"], "base_url": second_llm.base_url},
    ]
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        endpoints=json.dumps(config),
        llm_base_url=second_llm.base_url,
        llm_api_key="sk-default",
    )
    table = load_endpoints(settings, environ={"FIRST_KEY": "sk-first"})
    messages = [{"role": "user", "content": "hello"}]
    async with aiohttp.ClientSession() as session:
        router = ModelRouter(session, table)
        one = await router.chat("one-a", messages, {})
        two = await router.chat("two-b", messages, {})
        other = await router.chat("three", messages, {})  # no match: the default endpoint
    assert one.content == expected_reply("one-a", messages)
    assert two.content == expected_reply("two-b", messages)
    assert other.content == expected_reply("three", messages)
    assert fake_llm.stats.total_requests == 1
    assert fake_llm.stats.authorization_headers == {"Bearer sk-first"}
    assert second_llm.stats.total_requests == 2
    assert second_llm.stats.authorization_headers == {"Bearer sk-default"}


def test_token_estimate_counts_the_prompt_and_max_tokens() -> None:
    messages = [{"role": "user", "content": "x" * 400}]
    assert estimate_tokens(messages, {"max_tokens": 50}, chars_per_token=4, assumed=512) == 154
    assert estimate_tokens(messages, {}, chars_per_token=4, assumed=512) == 616
    parts = [{"role": "user", "content": [{"type": "text", "text": "y" * 40}]}]
    assert estimate_tokens(parts, {"max_completion_tokens": 1}, chars_per_token=4, assumed=0) == 15
