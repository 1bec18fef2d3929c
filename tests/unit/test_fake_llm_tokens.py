"""The fake LLM's tokenizer option and its simulation of Ollama's silent truncation."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from promptq.testing import FakeLLM, FakeLLMConfig


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def usage_of(http: aiohttp.ClientSession, llm: FakeLLM, content: str) -> dict[str, int]:
    body = {"model": "fake-small", "messages": [{"role": "user", "content": content}]}
    async with http.post(f"{llm.base_url}/chat/completions", json=body) as response:
        assert response.status == 200
        usage: dict[str, int] = (await response.json())["usage"]
        return usage


async def test_prompt_tokens_are_words_by_default_or_characters_when_asked(
    http: aiohttp.ClientSession,
) -> None:
    async with FakeLLM() as words, FakeLLM(FakeLLMConfig(chars_per_token=4.0)) as chars:
        assert (await usage_of(http, words, "abcdefgh ijkl"))["prompt_tokens"] == 2 + 3
        assert (await usage_of(http, chars, "abcdefgh ijkl"))["prompt_tokens"] == 4 + 3


async def test_a_prompt_over_the_window_still_gets_a_200_with_capped_usage(
    http: aiohttp.ClientSession,
) -> None:
    # Given a fake with a 10-token window
    async with FakeLLM(FakeLLMConfig(context_window_tokens=10)) as llm:
        # When prompts under and over it arrive
        short = await usage_of(http, llm, "one two three")
        long = await usage_of(http, llm, " ".join(["word"] * 50))

        # Then both are answered; the long one reports only what fits, and is counted
        assert short["prompt_tokens"] == 3 + 3
        assert long["prompt_tokens"] == 10
        assert llm.stats.truncated_requests == 1
        assert llm.stats.to_dict()["truncated_requests"] == 1


async def test_the_new_options_are_validated_at_runtime(http: aiohttp.ClientSession) -> None:
    async with FakeLLM() as llm:
        for bad in ({"context_window_tokens": 0}, {"chars_per_token": -1}):
            async with http.post(f"{llm.url}/_fake/config", data=json.dumps(bad)) as response:
                assert response.status == 400
        good = {"context_window_tokens": 100, "chars_per_token": 3.5}
        async with http.post(f"{llm.url}/_fake/config", data=json.dumps(good)) as response:
            assert response.status == 200
        assert (llm.config.context_window_tokens, llm.config.chars_per_token) == (100, 3.5)
    with pytest.raises(ValueError):
        FakeLLMConfig(chars_per_token=0)
