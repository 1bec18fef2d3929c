"""SIGKILL a worker while it holds global-limit permits: the permits come back by themselves.

Given an endpoint limited to 2 calls in flight and a worker whose two calls hang, the worker
renews its permits' leases for as long as the calls run. When it is SIGKILLed, nobody
renews them, they lapse within a lease, and another worker can call the endpoint again: the
orphaned jobs and a new one all succeed.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from redis.asyncio import Redis

from promptq.limits import RedisLimits
from promptq.models import JobStatus
from promptq.schemas import PromptJobCreate
from promptq.service import JobService
from promptq.settings import Settings
from promptq.testing.fake_llm import FakeLLM
from tests.conftest import wait_for, wait_terminal
from tests.e2e.conftest import Procs

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

#: A short lease, so that the test takes seconds; the mechanism is the same at any length.
LEASE_S = 1.5


def prompt(content: str) -> PromptJobCreate:
    return PromptJobCreate.model_validate(
        {"kind": "prompt", "messages": [{"role": "user", "content": content}]}
    )


async def test_permits_of_a_killed_worker_come_back(
    chaos_settings: Settings, chaos_service: JobService, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    config = [
        {
            "name": "fake",
            "models": ["*"],
            "base_url": fake_llm.base_url,
            "limits": {"max_in_flight": 2},
        }
    ]
    settings = chaos_settings.with_overrides(
        endpoints=json.dumps(config), lease_s=LEASE_S, llm_timeout_s=60.0
    )
    procs = Procs(settings, tmp_path)
    redis = Redis.from_url(settings.redis_url)
    limits = RedisLimits(redis, settings.queue_name)
    inflight_key = limits.keys("fake")[0]
    try:
        # Given a worker whose two calls hang (the next call of each prompt answers at once)
        doomed = procs.start("worker", "--concurrency", "4", name="doomed")
        held = [
            (await chaos_service.submit(prompt(f"hold {i} [[fake: sleep:60000, ok]]")))[0].id
            for i in range(2)
        ]
        await fake_llm.wait_for_requests(2, timeout_s=30)

        async def two_held() -> bool:
            return bool((await limits.state("fake")).in_flight == 2)

        await wait_for(two_held, timeout_s=5)
        # its permits' leases are renewed while the calls run
        first = max(score for _, score in await redis.zrange(inflight_key, 0, -1, withscores=True))

        async def renewed() -> bool:
            scores = await redis.zrange(inflight_key, 0, -1, withscores=True)
            return len(scores) == 2 and min(score for _, score in scores) > first

        await wait_for(renewed, timeout_s=LEASE_S * 3)

        # When it is SIGKILLed
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=10)

        # Then the permits lapse by themselves
        async def released() -> bool:
            return bool((await limits.state("fake")).in_flight == 0)

        await wait_for(released, timeout_s=LEASE_S + 5)

        # and another worker runs the orphans and a new job within the limit
        procs.start("worker", "--concurrency", "4", name="survivor")
        fresh = (await chaos_service.submit(prompt("after the kill")))[0].id
        try:
            await wait_terminal(chaos_service.store, [*held, fresh], timeout_s=45)
        except TimeoutError:
            print(procs.logs())
            raise
        states = await chaos_service.store.get_states([*held, fresh])
        assert {s.status for s in states.values()} == {JobStatus.SUCCEEDED}
        await wait_for(released, timeout_s=5)
    finally:
        procs.stop_all()
        await redis.aclose()
