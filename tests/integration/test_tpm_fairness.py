"""A call needing more tokens than the tpm budget, or more than is left, is not starved by the
smaller calls that arrive after it (real Redis; the worker's Limiter)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from redis.asyncio import Redis

from promptq.endpoints import load_endpoints
from promptq.limits import HOLD_S, RedisLimits, ScopeLimits
from promptq.settings import Settings
from tests.integration.conftest import pid
from worker.limiter import Limiter

CFG = ScopeLimits(tpm_per_window=100, window_s=1.0)


async def test_later_calls_leave_room_for_the_first_refused(limits: RedisLimits) -> None:
    # Given 30 tokens in the window
    assert (await limits.acquire("ep", CFG, permit_id=pid(), lease_s=30, tokens=30)).granted
    # When a call of 500 tokens (more than the budget of 100) is refused
    big = await limits.acquire("ep", CFG, permit_id=pid(), lease_s=30, tokens=500, waiter="big")
    assert (big.granted, big.reason) == (False, "tpm")
    # Then smaller calls after it wait too, though they would fit
    small = await limits.acquire("ep", CFG, permit_id=pid(), lease_s=30, tokens=10, waiter="s")
    assert (small.granted, small.reason) == (False, "tpm")
    # and the big call goes once the window is empty, reserving the whole budget
    grant = big
    async with asyncio.timeout(3):
        while not grant.granted:
            await asyncio.sleep(grant.wait_s)
            grant = await limits.acquire(
                "ep", CFG, permit_id=pid(), lease_s=30, tokens=500, waiter="big"
            )
    assert grant.tokens == 100
    assert (await limits.state("ep", CFG)).tokens_in_window == 100
    # the line is free again: the next call waits only for tokens
    assert not await limits.redis.exists(limits.keys("ep")[6])


async def test_a_job_handed_back_keeps_its_place_for_tokens(limits: RedisLimits) -> None:
    assert (await limits.acquire("ep", CFG, permit_id=pid(), lease_s=30, tokens=30)).granted
    refused = await limits.acquire("ep", CFG, permit_id=pid(), lease_s=30, tokens=500, job_id="big")
    assert not refused.granted
    # Many jobs already in line: the holder is still due as soon as there may be room
    for _ in range(20):
        grant = await limits.acquire("ep", ScopeLimits(), permit_id=pid(), lease_s=1, tokens=1)
        assert grant.granted
    for i in range(10):
        await limits.defer("ep", f"other{i}", shortest_s=0.01, longest_s=60)
    assert await limits.defer("ep", "big", shortest_s=3, longest_s=60) == 3
    # and keeps its place until then and HOLD_S more
    ttl_ms = await limits.redis.pttl(limits.keys("ep")[6])
    assert 3000 + HOLD_S * 1000 - 500 < ttl_ms <= 3000 + HOLD_S * 1000


async def test_a_call_over_the_budget_is_not_starved_by_steady_small_traffic(
    redis_url: str, tmp_path: Path
) -> None:
    # Given tpm 6000 counted over 1 s (100 tokens per window) and a stream of small calls
    # (20 tokens reserved, 5 used), which never leaves the window empty
    limits = {"tpm": 6000, "window_s": 1}
    config = [{"name": "ep", "models": ["*"], "base_url": "http://x/v1", "limits": limits}]
    settings = Settings(
        _env_file=None, data_dir=tmp_path, redis_url=redis_url, endpoints=json.dumps(config)
    )
    table = load_endpoints(settings)
    endpoint = table.resolve("m")
    client = Redis.from_url(redis_url)
    limiter = Limiter(RedisLimits(client, "promptq:test"), table, lease_s=6, wait_s=0.5)
    small_calls: list[float] = []
    stop = asyncio.Event()

    async def small_traffic() -> None:
        while not stop.is_set():
            permit = await limiter.acquire(endpoint, "m", 20)
            small_calls.append(time.monotonic())
            await limiter.release(permit, tokens_used=5, latency_s=0.01, overload=False)
            await asyncio.sleep(0.01)

    streams = [asyncio.create_task(small_traffic()) for _ in range(3)]
    try:
        async with asyncio.timeout(3):
            while len(small_calls) < 10:
                await asyncio.sleep(0.01)
        # When a call of 1000 tokens comes
        async with asyncio.timeout(4):
            big = await limiter.acquire(endpoint, "m", 1000)
        # Then it ran within about a window, reserving the whole budget
        assert big.tokens == 100
        granted = time.monotonic()
        await limiter.release(big, tokens_used=100, latency_s=0.01, overload=False)
        # and the small calls go on after it
        async with asyncio.timeout(4):
            while not small_calls or small_calls[-1] <= granted:
                await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*streams, return_exceptions=True)
        await client.aclose()
