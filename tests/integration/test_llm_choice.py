"""Which model `promptq demo` / `up` use: the configured URL, else Ollama, else the bundled
model, else the built-in fake. "Ollama" here is the fake LLM on a port the test picks."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from promptq import bundled_llm
from promptq.llm_choice import FAKE_MODEL, LLMKind, pick_model, resolve_llm
from promptq.settings import Settings
from promptq.testing.fake_llm import FakeLLM, FakeLLMConfig
from tests.conftest import base_settings
from tests.e2e.conftest import free_port


def settings_for(tmp_path: Path, url: str, **overrides: object) -> Settings:
    return base_settings(tmp_path, "", llm_base_url=url, **overrides)


async def chat(base_url: str, model: str) -> dict[str, object]:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi"}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base_url}/chat/completions", json=body) as response,
    ):
        assert response.status == 200
        data: dict[str, object] = await response.json()
        return data


@pytest.fixture
async def nothing_listening() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


@pytest.fixture
async def empty_ollama() -> AsyncIterator[str]:
    """An Ollama that answers but has pulled no model."""

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    await runner.cleanup()


async def test_a_configured_url_is_used_as_it_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path, "http://llm.invalid:1234/v1", default_model="m1")
    with caplog.at_level(logging.WARNING, logger="promptq.llm_choice"):
        async with resolve_llm(settings, explicit=True) as choice:
            assert choice.kind is LLMKind.CONFIGURED
            assert choice.settings is settings
    assert "llm: http://llm.invalid:1234/v1, model m1 (PROMPTQ_LLM_BASE_URL)" in caplog.text


@pytest.mark.parametrize(("wanted", "picked"), [("fake-large", "fake-large"), ("x", "fake-small")])
async def test_ollama_is_used_when_it_answers_with_one_of_its_models(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, wanted: str, picked: str
) -> None:
    async with FakeLLM(FakeLLMConfig(models=["fake-small", "fake-large"])) as ollama:
        settings = settings_for(tmp_path, ollama.base_url, default_model=wanted)
        with caplog.at_level(logging.WARNING, logger="promptq.llm_choice"):
            async with resolve_llm(settings, explicit=False) as choice:
                assert choice.kind is LLMKind.OLLAMA
                assert choice.settings.llm_base_url == ollama.base_url
                assert choice.settings.default_model == picked
                assert (await chat(choice.settings.llm_base_url, picked))["model"] == picked
    assert f"llm: Ollama at {ollama.base_url}, model {picked}" in caplog.text
    assert ("it has no x" in caplog.text) == (wanted == "x")


async def test_neither_falls_back_to_the_fake_model_and_says_so(
    tmp_path: Path, nothing_listening: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path, nothing_listening)
    with caplog.at_level(logging.WARNING, logger="promptq.llm_choice"):
        async with resolve_llm(settings, explicit=False, allow_bundled=False) as choice:
            assert choice.kind is LLMKind.FAKE
            assert choice.settings.default_model == FAKE_MODEL
            await chat(choice.settings.llm_base_url, FAKE_MODEL)  # it really serves
            fake_url = choice.settings.llm_base_url
    assert f"FAKE model at {fake_url}, because no Ollama answers at {nothing_listening}" in (
        caplog.text
    )
    assert "CANNED" in choice.notice and bundled_llm.INSTALL_HINT in choice.notice
    assert "PROMPTQ_LLM_BASE_URL" in choice.notice and "ollama pull" in choice.notice
    with pytest.raises(aiohttp.ClientConnectionError):  # stopped on exit
        await chat(fake_url, FAKE_MODEL)


async def test_an_ollama_without_models_counts_as_absent(tmp_path: Path, empty_ollama: str) -> None:
    settings = settings_for(tmp_path, empty_ollama)
    async with resolve_llm(settings, explicit=False, allow_bundled=False) as choice:
        assert choice.kind is LLMKind.FAKE
        assert f"Ollama at {empty_ollama} has no model (`ollama pull llama3.2`)" in choice.summary


async def test_without_the_local_extra_the_fake_model_says_what_to_install(
    tmp_path: Path, nothing_listening: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a machine where `promptq[local]` is not installed.
    monkeypatch.setattr(bundled_llm, "REQUIRED_MODULES", ("promptq_not_installed",))
    settings = settings_for(tmp_path, nothing_listening)
    async with resolve_llm(settings, explicit=False) as choice:
        assert choice.kind is LLMKind.FAKE
        assert "needs the `local` extra (promptq_not_installed missing)" in choice.summary
        assert bundled_llm.INSTALL_HINT in choice.summary


def test_pick_model_prefers_the_wanted_one_and_ollamas_latest_tag() -> None:
    assert pick_model(["a", "llama3.2:latest"], "llama3.2") == "llama3.2:latest"
    assert pick_model(["a", "b"], "b") == "b"
    assert pick_model(["a", "b"], "c") == "a"


def test_the_bundled_server_command_loads_the_model_on_localhost() -> None:
    command = bundled_llm.server_command(Path("/m.gguf"), 8123, context_window_tokens=4096)
    args = dict(zip(command[3::2], command[4::2], strict=True))
    assert command[1:3] == ["-m", "llama_cpp.server"]
    assert args["--model"] == "/m.gguf" and args["--host"] == "127.0.0.1"
    assert args["--port"] == "8123" and args["--n_ctx"] == "4096"
    assert args["--model_alias"] == bundled_llm.MODEL_ALIAS
    assert args["--interrupt_requests"] == "false" and args["--chat_format"] == "gemma"
