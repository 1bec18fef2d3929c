"""Lose Redis in the middle of a batch: kill and restart it empty, or FLUSHALL it.

Given a `promptq worker` on a private redis-server with no persistence, when Redis dies and
comes back empty (or is flushed) mid-batch, and more jobs are submitted while it is down, then
the worker process keeps running, and every job, in flight, queued or submitted meanwhile,
ends succeeded exactly once (the reconciler re-enqueues from SQL whatever Redis lost).
"""

from __future__ import annotations

from collections import Counter

import pytest
import redis

from promptq.models import AttemptOutcome, JobStatus
from promptq.schemas import PromptJobCreate
from promptq.service import JobService
from promptq.testing.fake_llm import FakeLLM, expected_reply
from tests.chaos.conftest import RedisServer
from tests.conftest import wait_for, wait_terminal
from tests.e2e.conftest import Procs

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.parametrize("database_url", ["postgres"], indirect=True),
]

BEFORE, DURING = 40, 5


def prompt(content: str) -> PromptJobCreate:
    """A prompt job request."""
    return PromptJobCreate.model_validate(
        {"kind": "prompt", "messages": [{"role": "user", "content": content}]}
    )


async def succeeded(service: JobService, job_ids: list[str]) -> int:
    """How many of the jobs have succeeded."""
    rows = [await service.store.get_job(job_id) for job_id in job_ids]
    return sum(1 for row in rows if row is not None and row.status == JobStatus.SUCCEEDED)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loss", ["restart", "flushall"])
async def test_the_worker_outlives_redis_and_every_job_ends_once(
    loss: str,
    chaos_service: JobService,
    chaos_procs: Procs,
    private_redis: RedisServer,
    fake_llm: FakeLLM,
) -> None:
    fake_llm.config.latency_ms = 300
    contents = [f"redis loss {loss} {i}" for i in range(BEFORE)]
    jobs = [(await chaos_service.submit(prompt(c)))[0] for c in contents]
    worker = chaos_procs.start("worker", "--concurrency", "4", name="worker")

    async def some_done() -> bool:
        return await succeeded(chaos_service, [j.id for j in jobs]) >= 8

    await wait_for(some_done, timeout_s=20, interval_s=0.05)
    if loss == "restart":
        private_redis.kill()

        async def worker_noticed() -> bool:
            return "Redis unavailable" in (chaos_procs.tmp / "worker.log").read_text()

        await wait_for(worker_noticed, timeout_s=10, interval_s=0.05)
    else:
        redis.Redis.from_url(private_redis.url).flushall()
    # Jobs submitted now are saved; while Redis is down they cannot be queued.
    more = [f"submitted during the {loss} {i}" for i in range(DURING)]
    jobs += [(await chaos_service.submit(prompt(c)))[0] for c in more]
    contents += more
    if loss == "restart":
        private_redis.start()

    try:
        await wait_terminal(chaos_service.store, [j.id for j in jobs], timeout_s=40)
    except TimeoutError:
        print(chaos_procs.logs())
        raise
    assert worker.poll() is None, "the worker exited:\n" + chaos_procs.logs()

    for content, job in zip(contents, jobs, strict=True):
        row = await chaos_service.store.get_job(job.id)
        assert row is not None and row.status == JobStatus.SUCCEEDED, (content, row)
        assert row.result == expected_reply("fake-small", [{"role": "user", "content": content}])
        history = await chaos_service.store.list_attempts(job.id)
        outcomes = Counter(a.outcome for a in history)
        assert outcomes[AttemptOutcome.SUCCEEDED] == 1, (content, outcomes)
        assert row.attempts == len(history)
        assert row.attempts - row.interruptions == len(history) - outcomes["interrupted"]
