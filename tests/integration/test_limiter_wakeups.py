"""worker.limiter.Limiter in two "workers" (each its own Redis connection) on the real Redis:
a permit given back in one wakes a call waiting for it in the other at once, through the
freed channel, not at its next try."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

import worker.limiter
from promptq.endpoints import Endpoint, load_endpoints
from promptq.limits import RedisLimits
from promptq.settings import Settings
from tests.conftest import wait_for
from worker.limiter import Limiter

MODEL = "model-a"


@pytest.fixture
async def limiters(redis_url: str, tmp_path: Path) -> AsyncIterator[list[Limiter]]:
    """Two started limiters sharing one endpoint limited to one call at a time."""
    config = [
        {"name": "one", "models": [MODEL], "base_url": "http://x", "limits": {"max_in_flight": 1}}
    ]
    settings = Settings(
        _env_file=None, data_dir=tmp_path, redis_url=redis_url, endpoints=json.dumps(config)
    )
    table = load_endpoints(settings)
    clients = [Redis.from_url(redis_url) for _ in range(2)]
    started = [
        Limiter(RedisLimits(client, "promptq:test"), table, lease_s=6, wait_s=0.5)
        for client in clients
    ]
    for limiter in started:
        limiter.start()

    async def both_listening() -> bool:
        [(_, listeners)] = await clients[0].pubsub_numsub(started[0].redis.freed_channel)
        return bool(listeners == 2)

    await wait_for(both_listening, timeout_s=10)
    yield started
    for limiter in started:
        await limiter.stop()
    for client in clients:
        await client.aclose()


def endpoint(limiter: Limiter) -> Endpoint:
    return limiter.table.resolve(MODEL)


async def test_a_permit_given_back_wakes_a_call_waiting_in_another_worker(
    limiters: list[Limiter], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fallback poll is an hour away: only the freed channel can wake the waiting call
    monkeypatch.setattr(worker.limiter, "IN_FLIGHT_POLL_S", 3600.0)
    a, b = limiters
    held = await a.acquire(endpoint(a), MODEL, tokens=10)
    waiting = asyncio.create_task(b.acquire(endpoint(b), MODEL, tokens=10))

    async def dozing() -> bool:
        scope = b._scopes.get(endpoint(b).scope(MODEL))
        return scope is not None and any(not s.done() for s in scope.sleepers)

    await wait_for(dozing, timeout_s=10)
    assert not waiting.done()

    # When worker A gives its permit back
    await a.release(held, tokens_used=10, latency_s=0.1, overload=False)

    # Then B's call gets it within seconds (its own next try would be half an hour away)
    permit = await asyncio.wait_for(waiting, timeout=10)
    assert permit.used and permit.scope == endpoint(b).scope(MODEL)
    assert (await b.redis.state(permit.scope)).in_flight == 1
    await b.release(permit, tokens_used=10, latency_s=0.1, overload=False)
    assert (await b.redis.state(permit.scope)).in_flight == 0


async def test_a_permit_given_back_wakes_one_waiting_call_per_worker(
    limiters: list[Limiter], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three calls wait in worker B; one permit comes free: one call gets it, and only the
    # call that has waited longest was woken for it (the others doze on, untouched)
    monkeypatch.setattr(worker.limiter, "IN_FLIGHT_POLL_S", 3600.0)
    a, b = limiters
    held = await a.acquire(endpoint(a), MODEL, tokens=10)
    waiting = [asyncio.create_task(b.acquire(endpoint(b), MODEL, tokens=10)) for _ in range(3)]
    scope = endpoint(b).scope(MODEL)

    async def all_dozing() -> bool:
        state = b._scopes.get(scope)
        return state is not None and sum(not s.done() for s in state.sleepers) == 3

    await wait_for(all_dozing, timeout_s=10)
    first, *others = list(b._scopes[scope].sleepers)

    await a.release(held, tokens_used=10, latency_s=0.1, overload=False)
    done, pending = await asyncio.wait(waiting, timeout=10, return_when=asyncio.FIRST_COMPLETED)

    assert len(done) == 1 and len(pending) == 2
    assert first.done() and not any(s.done() for s in others)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await b.release(done.pop().result(), tokens_used=10, latency_s=0.1, overload=False)


async def test_the_freed_channel_is_per_database() -> None:
    # Pub/sub ignores the database number: two deployments sharing one Redis on databases 1
    # and 2 (same prefix) must not announce their permits to each other
    clients = [Redis(db=db) for db in (1, 2)]
    channels = {RedisLimits(client, "promptq").freed_channel for client in clients}
    for client in clients:
        await client.aclose()
    assert len(channels) == 2
