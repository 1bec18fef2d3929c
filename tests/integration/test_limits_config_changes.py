"""Limits in Redis after a config change (a new window_s, new in-flight bounds): what was
counted or learnt under the old config never counts wrongly under the new one (real Redis)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from promptq.cli_endpoints import _row, read_states
from promptq.endpoints import load_endpoints
from promptq.limits import RedisLimits, ScopeLimits
from promptq.settings import Settings
from tests.integration.conftest import pid
from worker.limiter import Limiter


async def take(limits: RedisLimits, cfg: ScopeLimits, n: int) -> int:
    """Acquire (and give back) up to `n` calls; how many were granted."""
    got = 0
    for _ in range(n):
        grant = await limits.acquire("ep", cfg, permit_id=pid(), lease_s=30, tokens=1)
        if not grant.granted:
            break
        got += 1
        await limits.release("ep", "x", bucket=grant.bucket, refund_request=False, token_delta=0)
    return got


async def test_calls_counted_under_a_shorter_window_leave_a_longer_one(
    limits: RedisLimits,
) -> None:
    # Given 10 calls counted under a 1 s window (its buckets are 50 ms)
    short = ScopeLimits(rpm_per_window=10, window_s=1.0)
    assert await take(limits, short, 20) == 10
    made = time.monotonic()
    # When the window becomes 2 s (buckets of 100 ms), they still count while they are less
    # than 2 s old...
    longer = ScopeLimits(rpm_per_window=20, window_s=2.0)
    assert (await limits.state("ep", longer)).requests_in_window == 10
    # ...and then leave the window, under a trickle of calls that keeps the counts alive
    # (they used to count for as long as calls kept coming)
    async with asyncio.timeout(4):
        while True:
            assert await take(limits, longer, 1) == 1
            counted = (await limits.state("ep", longer)).requests_in_window
            if counted < 10:
                break
            await asyncio.sleep(0.4)  # the pace of the trickle, not a wait for a condition
    assert time.monotonic() - made >= 1.5  # not before they were a window old
    assert await take(limits, longer, 30) >= 20 - counted  # (more may have left meanwhile)


async def test_calls_counted_under_a_longer_window_still_count_in_a_shorter_one(
    limits: RedisLimits,
) -> None:
    # Given 10 calls just counted under a 2 s window (its buckets are 100 ms)
    assert await take(limits, ScopeLimits(rpm_per_window=10, window_s=2.0), 10) == 10
    # When the window becomes 1 s with the same 10 calls per window, they are all in it:
    # none more may go now
    shorter = ScopeLimits(rpm_per_window=10, window_s=1.0)
    assert (await limits.state("ep", shorter)).requests_in_window == 10
    refused = await limits.acquire("ep", shorter, permit_id=pid(), lease_s=30, tokens=1)
    assert (refused.granted, refused.reason) == (False, "rpm")
    assert refused.wait_s <= 1.1


ADAPTIVE_16 = ScopeLimits(max_in_flight=16, adaptive=True, initial_in_flight=16)


async def test_a_stored_adaptive_limit_is_reported_within_the_current_bounds(
    limits: RedisLimits,
) -> None:
    # Given an adaptive limit that reached 16
    assert (await limits.acquire("ep", ADAPTIVE_16, permit_id=pid(), lease_s=30, tokens=1)).granted
    assert (await limits.state("ep", ADAPTIVE_16)).adaptive_limit == 16
    # When the endpoint now has a fixed limit of 3, no adaptive limit is reported
    fixed = ScopeLimits(max_in_flight=3)
    assert (await limits.state("ep", fixed)).adaptive_limit is None
    # and when it is adaptive up to 3, it is reported as 3, and stored so by the next call
    adaptive_3 = ScopeLimits(max_in_flight=3, adaptive=True)
    assert (await limits.state("ep", adaptive_3)).adaptive_limit == 3
    assert await limits.observe("ep", adaptive_3, latency_s=0.1, overload=False) == 3
    assert (await limits.state("ep")).adaptive_limit == 3  # the raw stored value
    # A window judged under the new bounds starts from 3, not from 16
    for _ in range(4):
        limit = await limits.observe("ep", adaptive_3, latency_s=None, overload=True)
    assert limit == pytest.approx(2.7)


def endpoints_settings(tmp_path: Path, redis_url: str, limits: dict[str, Any]) -> Settings:
    config = [{"name": "ep", "models": ["*"], "base_url": "http://x/v1", "limits": limits}]
    return Settings(
        _env_file=None,
        data_dir=tmp_path,
        redis_url=redis_url,
        queue_name="promptq:test",
        endpoints=json.dumps(config),
    )


async def test_cli_and_metrics_show_the_limit_of_the_current_config(
    limits: RedisLimits, redis_url: str, tmp_path: Path
) -> None:
    # Given an adaptive limit of 16 stored by the old config
    assert (await limits.acquire("ep", ADAPTIVE_16, permit_id=pid(), lease_s=1, tokens=1)).granted
    for new, shown in (({"max_in_flight": 3}, None), ({"max_in_flight": 3, "adaptive": True}, 3)):
        # When workers and `promptq endpoints` run with the new one
        settings = endpoints_settings(tmp_path, redis_url, new)
        table = load_endpoints(settings)
        endpoint = table.resolve("m")
        states = await read_states(limits.redis, settings, table)
        row = _row(endpoint, states["ep"])
        assert row["scopes"][0]["adaptive_limit"] == shown
        assert "16" not in row["now_text"]
        limiter = Limiter(limits, table, lease_s=6, wait_s=0.5)
        permit = await limiter.acquire(endpoint, "m", 1)
        await limiter.release(permit, tokens_used=1, latency_s=0.1, overload=False)
        [snapshot] = await limiter.snapshot()
        # the Prometheus gauge: the adaptive limit, else max_in_flight
        assert snapshot.limit == 3.0
