"""The limiter's Lua scripts (promptq.limits) against the real Redis: no mocks."""

from __future__ import annotations

import asyncio

import pytest

import promptq.limits
from promptq.limits import RedisLimits, ScopeLimits
from tests.conftest import wait_for
from tests.integration.conftest import pid


async def test_in_flight_is_atomic_under_concurrent_acquires(limits: RedisLimits) -> None:
    # Given a limit of 5, when 40 acquires race
    cfg = ScopeLimits(max_in_flight=5)
    grants = await asyncio.gather(
        *(limits.acquire("ep", cfg, permit_id=pid(), lease_s=30, tokens=1) for _ in range(40))
    )
    # Then exactly 5 win, the others are told what is full
    assert sum(g.granted for g in grants) == 5
    assert {g.reason for g in grants if not g.granted} == {"max_in_flight"}
    assert (await limits.state("ep")).in_flight == 5


async def test_release_frees_a_permit(limits: RedisLimits) -> None:
    cfg = ScopeLimits(max_in_flight=1)
    first = pid()
    grant = await limits.acquire("ep", cfg, permit_id=first, lease_s=30, tokens=1)
    assert grant.granted
    assert not (await limits.acquire("ep", cfg, permit_id=pid(), lease_s=30, tokens=1)).granted
    await limits.release("ep", first, bucket=grant.bucket, refund_request=False, token_delta=0)
    assert (await limits.acquire("ep", cfg, permit_id=pid(), lease_s=30, tokens=1)).granted


async def test_a_lapsed_lease_comes_back_and_a_renewed_one_does_not(
    limits: RedisLimits,
) -> None:
    cfg = ScopeLimits(max_in_flight=2)
    kept, lost = pid(), pid()
    for permit in (kept, lost):
        assert (await limits.acquire("ep", cfg, permit_id=permit, lease_s=0.4, tokens=1)).granted

    async def renew_kept() -> None:
        while True:
            await limits.renew("ep", [kept], lease_s=0.4)
            await asyncio.sleep(0.1)

    renewer = asyncio.create_task(renew_kept())
    try:
        # The unrenewed permit lapses: one acquire succeeds, the renewed one still counts
        async def one_free() -> bool:
            grant = await limits.acquire("ep", cfg, permit_id=pid(), lease_s=30, tokens=1)
            return grant.granted

        await wait_for(one_free, timeout_s=5)
        assert not (await limits.acquire("ep", cfg, permit_id=pid(), lease_s=30, tokens=1)).granted
        assert await limits.renew("ep", [kept, lost], lease_s=0.4) == 1
    finally:
        renewer.cancel()
        await asyncio.gather(renewer, return_exceptions=True)


async def test_requests_per_window(limits: RedisLimits) -> None:
    cfg = ScopeLimits(rpm_per_window=3, window_s=1.0)
    grants = [
        await limits.acquire("ep", cfg, permit_id=pid(), lease_s=30, tokens=1) for _ in range(4)
    ]
    assert [g.granted for g in grants] == [True, True, True, False]
    refused = grants[-1]
    assert refused.reason == "rpm"
    assert 0 < refused.wait_s <= 1.1
    assert (await limits.state("ep", window_s=1.0)).requests_in_window == 3
    await asyncio.sleep(refused.wait_s)  # the hint says when the oldest request leaves
    assert (await limits.acquire("ep", cfg, permit_id=pid(), lease_s=30, tokens=1)).granted


async def test_an_unused_permit_gives_its_request_back(limits: RedisLimits) -> None:
    cfg = ScopeLimits(rpm_per_window=1, window_s=60)
    permit = pid()
    grant = await limits.acquire("ep", cfg, permit_id=permit, lease_s=30, tokens=1)
    assert not (await limits.acquire("ep", cfg, permit_id=pid(), lease_s=30, tokens=1)).granted
    await limits.release("ep", permit, bucket=grant.bucket, refund_request=True, token_delta=-1)
    assert (await limits.acquire("ep", cfg, permit_id=pid(), lease_s=30, tokens=1)).granted


async def test_tokens_reserved_then_corrected_by_actual_usage(limits: RedisLimits) -> None:
    cfg = ScopeLimits(tpm_per_window=100, window_s=60)
    first = pid()
    grant = await limits.acquire("ep", cfg, permit_id=first, lease_s=30, tokens=60)
    assert grant.granted
    # 60 reserved: another 60 does not fit
    refused = await limits.acquire("ep", cfg, permit_id=pid(), lease_s=30, tokens=60)
    assert (refused.granted, refused.reason) == (False, "tpm")
    # The call really used 10 tokens: the reservation shrinks and 60 fit again
    await limits.release("ep", first, bucket=grant.bucket, refund_request=False, token_delta=-50)
    assert (await limits.state("ep")).tokens_in_window == 10
    assert (await limits.acquire("ep", cfg, permit_id=pid(), lease_s=30, tokens=60)).granted


async def test_a_call_larger_than_the_limit_runs_alone(limits: RedisLimits) -> None:
    cfg = ScopeLimits(tpm_per_window=100, window_s=60)
    assert (await limits.acquire("ep", cfg, permit_id=pid(), lease_s=30, tokens=500)).granted
    assert not (await limits.acquire("ep", cfg, permit_id=pid(), lease_s=30, tokens=1)).granted


async def test_scopes_are_independent(limits: RedisLimits) -> None:
    cfg = ScopeLimits(max_in_flight=1)
    assert (await limits.acquire("a", cfg, permit_id=pid(), lease_s=30, tokens=1)).granted
    assert (await limits.acquire("b", cfg, permit_id=pid(), lease_s=30, tokens=1)).granted
    assert not (await limits.acquire("a", cfg, permit_id=pid(), lease_s=30, tokens=1)).granted


ADAPTIVE = ScopeLimits(
    max_in_flight=10, adaptive=True, min_in_flight=2, initial_in_flight=4, decrease_factor=0.8
)


async def busy(limits: RedisLimits, calls: int) -> None:
    """Put `calls` calls in flight in scope "ep" (past the adaptive limit)."""
    for _ in range(calls):
        unlimited = ScopeLimits(max_in_flight=1000)
        assert (
            await limits.acquire("ep", unlimited, permit_id=pid(), lease_s=30, tokens=1)
        ).granted


async def observe_window(
    limits: RedisLimits, calls: int, *, overloads: int = 0, latency_s: float = 0.1
) -> float:
    """One window's worth of observations."""
    limit = 0.0
    for i in range(calls):
        bad = i < overloads
        limit = await limits.observe(
            "ep", ADAPTIVE, latency_s=None if bad else latency_s, overload=bad
        )
    return limit


async def test_adaptive_limit_starts_at_initial_and_is_enforced(limits: RedisLimits) -> None:
    grants = [
        await limits.acquire("ep", ADAPTIVE, permit_id=pid(), lease_s=30, tokens=1)
        for _ in range(6)
    ]
    assert sum(g.granted for g in grants) == 4
    assert (await limits.state("ep")).adaptive_limit == 4


async def test_adaptive_increases_per_clean_busy_window(limits: RedisLimits) -> None:
    # A window holds max(5, limit) calls; each clean one in which the limit was used adds 1
    await busy(limits, 10)
    assert await observe_window(limits, 5) == 5
    assert await observe_window(limits, 5) == 6
    assert await observe_window(limits, 4) == 6  # not judged before it is full


async def test_an_unused_limit_is_not_raised(limits: RedisLimits) -> None:
    await busy(limits, 3)  # fewer calls in flight than the limit of 4
    assert await observe_window(limits, 5) == 4


async def test_one_error_in_a_window_does_not_decrease(limits: RedisLimits) -> None:
    await busy(limits, 10)
    assert await observe_window(limits, 5, overloads=1) == 4  # held, not raised, not cut


async def test_repeated_overload_decreases_by_the_factor_within_bounds(
    limits: RedisLimits,
) -> None:
    assert await observe_window(limits, 5, overloads=2) == pytest.approx(3.2)
    assert await observe_window(limits, 5, overloads=5) == pytest.approx(2.56)
    assert await observe_window(limits, 5, overloads=5) == pytest.approx(2.048)
    assert await observe_window(limits, 5, overloads=5) == 2  # the floor
    assert (await limits.state("ep")).decreases == 4


async def test_a_learnt_limit_lapses_after_a_quiet_spell(
    limits: RedisLimits, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(promptq.limits, "ADAPTIVE_MEMORY_S", 0.5)
    assert await observe_window(limits, 5, overloads=2) == pytest.approx(3.2)

    async def forgotten() -> bool:
        return (await limits.state("ep")).adaptive_limit is None

    await wait_for(forgotten, timeout_s=10)
    # The next calls start again from `initial_in_flight`
    grants = [
        await limits.acquire("ep", ADAPTIVE, permit_id=pid(), lease_s=30, tokens=1)
        for _ in range(6)
    ]
    assert sum(g.granted for g in grants) == ADAPTIVE.initial_in_flight


async def test_a_latency_rise_decreases(limits: RedisLimits) -> None:
    await busy(limits, 10)
    assert await observe_window(limits, 5, latency_s=0.1) == 5
    assert await observe_window(limits, 5, latency_s=0.5) == pytest.approx(4.0)


async def test_adaptive_never_exceeds_its_maximum(limits: RedisLimits) -> None:
    await busy(limits, 20)
    for _ in range(10):
        limit = await observe_window(limits, 10)
    assert limit == 10


async def test_a_job_handed_back_queues_behind_those_already_waiting(
    limits: RedisLimits,
) -> None:
    # Without any call granted lately there is no rate to go by: the shortest defer
    assert await limits.defer("ep", "early", shortest_s=0.05, longest_s=60) == 0.05
    # Given calls being granted, jobs handed back line up: each later one is due later
    cfg = ScopeLimits(max_in_flight=1000)
    for _ in range(10):
        assert (await limits.acquire("ep", cfg, permit_id=pid(), lease_s=30, tokens=1)).granted
    defers = [await limits.defer("ep", f"job{i}", shortest_s=0.001, longest_s=60) for i in range(6)]
    assert defers == sorted(defers)
    assert defers[-1] > defers[1] > 0.001
    assert (await limits.state("ep")).waiting == 7
    # A job that gets its permit leaves the line; one handed back again keeps its place
    grant = await limits.acquire("ep", cfg, permit_id=pid(), lease_s=30, tokens=1, job_id="job0")
    assert grant.granted
    assert (await limits.state("ep")).waiting == 6
    again = await limits.defer("ep", "job1", shortest_s=0.001, longest_s=60)
    assert again < defers[3]  # only "early" is ahead of it, not the five others
    assert (await limits.state("ep")).waiting == 6
    # and no job is put off longer than the longest defer
    assert await limits.defer("ep", "late", shortest_s=0.001, longest_s=0.002) == 0.002
