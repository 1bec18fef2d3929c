"""Testing helpers for promptq: a scriptable fake OpenAI-compatible LLM server."""

from __future__ import annotations

from promptq.testing.fake_llm import (
    FAKE_LLM_STATE,
    FakeLLM,
    FakeLLMConfig,
    FakeLLMState,
    FakeLLMStats,
    count_tokens,
    create_fake_llm_app,
    expected_reply,
    serve,
)

__all__ = [
    "FAKE_LLM_STATE",
    "FakeLLM",
    "FakeLLMConfig",
    "FakeLLMState",
    "FakeLLMStats",
    "count_tokens",
    "create_fake_llm_app",
    "expected_reply",
    "serve",
]
