"""Which model `promptq demo` and `promptq up` talk to, chosen at start-up and always logged.

1. `PROMPTQ_LLM_BASE_URL` (or `promptq demo --llm-url`) when it is set: used as it is.
2. Else Ollama, when it answers on localhost:11434 and has a model: `PROMPTQ_DEFAULT_MODEL`
   if it has that one, else its first model (and it says which).
3. Else the bundled local model (`promptq[local]`: llama.cpp serving Gemma 3 270M).
4. Else, when that extra is missing or its server fails, promptq's built-in FAKE model, with a
   loud notice, so that the pipeline still runs on any machine.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum

import aiohttp

from promptq import bundled_llm
from promptq.settings import Settings

logger = logging.getLogger(__name__)

#: How long a local Ollama may take to list its models before it counts as absent.
PROBE_TIMEOUT_S = 1.5
#: Latency of the built-in fake model, so the concurrency speed-up is visible.
FAKE_LATENCY_MS = 400.0
FAKE_MODEL = "promptq-fake"
#: The bundled server computes one request at a time: more in flight only queue up in it (and
#: run into the timeout on a slow machine), so workers send it a few at a time.
BUNDLED_CONCURRENCY = 4
BUNDLED_TIMEOUT_S = 600.0

HOW_TO_USE_A_REAL_MODEL = (
    "For real quality, point promptq at a bigger model: `ollama serve` + "
    "`ollama pull llama3.2` (found automatically on localhost:11434), or a hosted API: "
    "PROMPTQ_LLM_BASE_URL=https://api.openai.com/v1 PROMPTQ_LLM_API_KEY=sk-... "
    "PROMPTQ_DEFAULT_MODEL=gpt-4o-mini"
)


class LLMKind(StrEnum):
    """Where the model came from."""

    CONFIGURED = "configured"
    OLLAMA = "ollama"
    BUNDLED = "bundled"
    FAKE = "fake"


@dataclass(frozen=True, slots=True)
class LLMChoice:
    """The chosen model: settings that point at it, and what to tell the user about it."""

    kind: LLMKind
    settings: Settings
    summary: str
    #: Caveats and how to do better; empty for a model the user chose.
    notice: str = ""
    #: The bundled model server promptq started, if it did.
    server: bundled_llm.BundledServer | None = None


async def ollama_models(base_url: str) -> list[str] | None:
    """The model ids an OpenAI-compatible server at `base_url` lists; None if it doesn't answer."""
    timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{base_url}/models") as response,
        ):
            if response.status != 200:
                return None
            data = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return None
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return None
    return [e["id"] for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]


def pick_model(available: list[str], wanted: str) -> str:
    """`wanted` if the server has it (Ollama adds `:latest` to untagged names), else the first."""
    for name in (wanted, f"{wanted}:latest"):
        if name in available:
            return name
    return available[0]


def _unset(settings: Settings, **values: object) -> dict[str, object]:
    """Those of `values` whose setting the user did not set explicitly."""
    return {k: v for k, v in values.items() if k not in settings.model_fields_set}


@asynccontextmanager
async def resolve_llm(
    settings: Settings, *, explicit: bool, allow_bundled: bool = True
) -> AsyncIterator[LLMChoice]:
    """Choose the model (see the module docstring), starting one if need be; log the choice.

    Unless `explicit`, `settings.llm_base_url` is where Ollama is looked for (its default is
    Ollama's address). `allow_bundled=False` skips the bundled model (straight to the fake).
    """
    if explicit:
        choice = LLMChoice(
            LLMKind.CONFIGURED,
            settings,
            f"{settings.llm_base_url}, model {settings.default_model} (PROMPTQ_LLM_BASE_URL)",
        )
        logger.warning("llm: %s", choice.summary)
        yield choice
        return

    reason = f"no Ollama answers at {settings.llm_base_url}"
    models = await ollama_models(settings.llm_base_url)
    if models:
        model = pick_model(models, settings.default_model)
        why = "" if model == settings.default_model else f"; it has no {settings.default_model}"
        choice = LLMChoice(
            LLMKind.OLLAMA,
            settings.with_overrides(default_model=model),
            f"Ollama at {settings.llm_base_url}, model {model} "
            f"(of {len(models)}: {', '.join(models[:5])}{why})",
        )
        logger.warning("llm: %s", choice.summary)
        yield choice
        return
    if models is not None:
        reason = f"Ollama at {settings.llm_base_url} has no model (`ollama pull llama3.2`)"

    async with AsyncExitStack() as stack:
        server = None
        if allow_bundled:
            try:
                server = await stack.enter_async_context(
                    bundled_llm.bundled_llm(
                        settings.data_dir, context_window_tokens=settings.context_window_tokens
                    )
                )
            except bundled_llm.BundledLLMUnavailable as exc:
                reason += f", and {exc.message}"
        if server is not None:
            choice = _bundled_choice(settings, server, reason)
            logger.warning("llm: %s", choice.summary)
            yield choice
            return

    async with _fake_choice(settings, reason) as choice:
        logger.warning("llm: %s", choice.summary)
        yield choice


def _bundled_choice(
    settings: Settings, server: bundled_llm.BundledServer, reason: str
) -> LLMChoice:
    tuned = settings.with_overrides(
        llm_base_url=server.base_url,
        default_model=server.model,
        # llama-cpp-python's stream carries no token usage; unstreamed answers do.
        summary_stream_final=False,
        **_unset(
            settings,
            worker_concurrency=min(settings.worker_concurrency, BUNDLED_CONCURRENCY),
            llm_timeout_s=max(settings.llm_timeout_s, BUNDLED_TIMEOUT_S),
        ),
    )
    return LLMChoice(
        LLMKind.BUNDLED,
        tuned,
        f"the bundled local model {server.model} (llama.cpp, pid {server.pid}) at "
        f"{server.base_url}, because {reason}",
        notice=(
            f"{server.model} is a TINY BASE model (270M parameters, 4-bit, CPU only): it shows "
            "the pipeline doing real work, but expect clumsy, repetitive or off-topic answers. "
            "It computes one request at a time, so concurrency cannot speed it up much. "
            f"Its log: {server.log_path}.\n{HOW_TO_USE_A_REAL_MODEL}"
        ),
        server=server,
    )


@asynccontextmanager
async def _fake_choice(settings: Settings, reason: str) -> AsyncIterator[LLMChoice]:
    from promptq.testing.fake_llm import FakeLLM, FakeLLMConfig

    config = FakeLLMConfig(latency_ms=FAKE_LATENCY_MS, jitter=0.3, models=[FAKE_MODEL])
    async with FakeLLM(config) as fake:
        yield LLMChoice(
            LLMKind.FAKE,
            settings.with_overrides(llm_base_url=fake.base_url, default_model=FAKE_MODEL),
            f"promptq's built-in FAKE model at {fake.base_url}, because {reason}",
            notice=(
                "Its answers are CANNED: no language model runs. For a real model on this "
                f"machine: {bundled_llm.INSTALL_HINT} (from a checkout: "
                "`.venv/bin/pip install -e '.[local]'`; pip builds llama.cpp from source once, "
                f"which takes a while).\n{HOW_TO_USE_A_REAL_MODEL}"
            ),
        )
