"""In a real worker (fake LLM over HTTP): a job whose max_tokens exceeds its endpoint's tpm
budget runs in its turn, not after every smaller job submitted after it."""

from __future__ import annotations

import json
import time

import pytest

from promptq.models import JobStatus
from promptq.schemas import PromptJobCreate
from promptq.service import JobService
from promptq.testing.fake_llm import FakeLLM
from tests.conftest import WorkerFactory, wait_terminal

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def prompt(content: str, max_tokens: int) -> PromptJobCreate:
    return PromptJobCreate.model_validate(
        {
            "kind": "prompt",
            "model": "fake-small",
            "messages": [{"role": "user", "content": content}],
            "params": {"max_tokens": max_tokens},
            "cache": False,
            "max_attempts": 20,
        }
    )


async def test_a_job_over_the_tpm_budget_is_not_starved_by_later_jobs(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given 200 tokens per 1 s window, and small jobs (max_tokens 20) that keep it busy
    limits = {"tpm": 12000, "window_s": 1}
    config = [{"name": "t", "models": ["*"], "base_url": fake_llm.base_url, "limits": limits}]
    await start_worker(worker_concurrency=4, endpoints=json.dumps(config))
    for i in range(4):
        await service.submit(prompt(f"a{i}", 20))
    # When a job of max_tokens 1000 comes, and 20 more small ones after it
    big = (await service.submit(prompt("big", 1000)))[0].id
    later = [(await service.submit(prompt(f"b{i}", 20)))[0].id for i in range(20)]
    started = time.monotonic()
    await wait_terminal(service.store, [big], timeout_s=10)
    # Then it ran within a few windows, long before the jobs submitted after it were done
    # (it used to wait for a moment with no other call in the window: after all of them)
    assert time.monotonic() - started < 5
    states = await service.store.get_states([big, *later])
    assert states[big].status == JobStatus.SUCCEEDED
    done_after = sum(states[i].status == JobStatus.SUCCEEDED for i in later)
    assert done_after <= 12, done_after
