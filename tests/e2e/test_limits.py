"""End to end: three `promptq worker` processes share one set of global limits.

Three endpoints, each on its own fake LLM server, so each server's records show one limit:
at most 3 calls in flight; at most 10 requests per 2 s window (rpm 300); at most 200 tokens
per 1 s window (tpm 12,000). Three workers of 4 slots could make 12 calls at once, so the
limits hold only if the workers really share them.

A permit is taken before the job is claimed, so a request reaches the server a little after
its permit (one SQL claim later, longer while three processes share one SQLite file). The
servers' arrival times are therefore checked over windows 20% shorter than the limiter's.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from promptq.models import JobStatus
from promptq.schemas import PromptJobCreate
from promptq.service import JobService
from promptq.settings import Settings
from promptq.testing.fake_llm import FakeLLM, FakeLLMConfig
from tests.conftest import wait_terminal
from tests.e2e.conftest import Procs

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]

MAX_IN_FLIGHT = 3
REQUESTS_PER_WINDOW = 10
RATE_WINDOW_S = 2.0
TOKENS_PER_WINDOW = 200
TOKENS_WINDOW_S = 1.0
#: Arrival windows are this much shorter than the limiter's (see the module docstring).
SLACK = 0.8


def busiest_window(times: list[float], window_s: float) -> int:
    """The most arrivals in any interval of `window_s`."""
    ordered = sorted(times)
    return max(
        (bisect.bisect_left(ordered, t + window_s) - i for i, t in enumerate(ordered)), default=0
    )


def prompt(model: str, content: str, **params: Any) -> PromptJobCreate:
    body = {"kind": "prompt", "model": model, "messages": [{"role": "user", "content": content}]}
    return PromptJobCreate.model_validate(body | ({"params": params} if params else {}))


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, FakeLLM]]:
    servers = {
        "flight": FakeLLM(FakeLLMConfig(latency_ms=150)),
        "rate": FakeLLM(),
        "tokens": FakeLLM(),
    }
    for server in servers.values():
        await server.start()
    yield servers
    for server in servers.values():
        await server.stop()


async def test_three_workers_share_in_flight_rpm_and_tpm_limits(
    settings: Settings, service: JobService, fakes: dict[str, FakeLLM], tmp_path: Path
) -> None:
    config = [
        {
            "name": "flight",
            "models": ["flight-*"],
            "base_url": fakes["flight"].base_url,
            "limits": {"max_in_flight": MAX_IN_FLIGHT},
        },
        {
            "name": "rate",
            "models": ["rate-*"],
            "base_url": fakes["rate"].base_url,
            "limits": {"rpm": 300, "window_s": RATE_WINDOW_S},
        },
        {
            "name": "tokens",
            "models": ["tokens-*"],
            "base_url": fakes["tokens"].base_url,
            "limits": {"tpm": 12_000, "window_s": TOKENS_WINDOW_S},
        },
    ]
    procs = Procs(settings.with_overrides(endpoints=json.dumps(config)), tmp_path)
    try:
        for i in range(3):
            procs.start("worker", "--concurrency", "4", name=f"worker{i}")
        # Long words: the limiter's estimate (characters / 4) exceeds the fake's word count,
        # and max_tokens caps the answer, so a reservation is never below the actual usage.
        padding = "abcdefghijklmnop " * 20
        requests = [
            *(prompt("flight-m", f"flight {i}") for i in range(18)),
            *(prompt("rate-m", f"rate {i}") for i in range(25)),
            *(prompt("tokens-m", f"tokens {i} {padding}", max_tokens=5) for i in range(16)),
        ]
        ids = [(await service.submit(request))[0].id for request in requests]
        try:
            await wait_terminal(service.store, ids, timeout_s=90)
        except TimeoutError:
            print(procs.logs())
            raise
    finally:
        procs.stop_all()

    states = await service.store.get_states(ids)
    assert {s.status for s in states.values()} == {JobStatus.SUCCEEDED}, procs.logs()

    flight = fakes["flight"].stats
    assert flight.total_requests == 18
    assert 2 <= flight.peak_in_flight <= MAX_IN_FLIGHT

    rate = fakes["rate"].stats
    assert rate.total_requests == 25
    assert busiest_window(rate.request_times, RATE_WINDOW_S * SLACK) <= REQUESTS_PER_WINDOW

    tokens = fakes["tokens"].stats
    assert tokens.total_requests == 16
    per_request = (tokens.prompt_tokens_total + tokens.completion_tokens_total) / 16
    busiest = busiest_window(tokens.request_times, TOKENS_WINDOW_S * SLACK)
    assert busiest * per_request <= TOKENS_PER_WINDOW
    assert busiest >= 2  # corrections let more than one call per window through
