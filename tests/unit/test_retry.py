"""The retry policy: which HTTP statuses are transient, Retry-After parsing, and backoff delays.

Pure functions, no I/O. Retry-After headers arrive from aiohttp as a case-insensitive
`multidict.CIMultiDictProxy`, so parsing is checked both with that and with plain lowercase dicts.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from worker.retry import backoff_delay_s, is_transient_status, parse_retry_after_s

NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)

# ----------------------------------------------------------------------------- is_transient_status


@pytest.mark.parametrize("status", [408, 409, 425, 429, 500, 501, 502, 503, 504, 529, 599])
def test_transient_statuses(status: int) -> None:
    assert is_transient_status(status) is True


@pytest.mark.parametrize("status", [200, 201, 301, 400, 401, 403, 404, 405, 413, 422, 499, 600])
def test_permanent_or_non_error_statuses(status: int) -> None:
    assert is_transient_status(status) is False


# ----------------------------------------------------------------------------- parse_retry_after_s


def ci(**headers: str) -> CIMultiDictProxy[str]:
    """Headers the way aiohttp hands them over: case-insensitive, canonical capitalisation."""
    names = {"retry_after": "Retry-After", "retry_after_ms": "Retry-After-Ms"}
    return CIMultiDictProxy(CIMultiDict({names[k]: v for k, v in headers.items()}))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        ("1.5", 1.5),
        ("0", 0.0),
        (" 7 ", 7.0),
        ("120", 120.0),
    ],
)
def test_retry_after_seconds(value: str, expected: float) -> None:
    assert parse_retry_after_s({"retry-after": value}, now=NOW) == expected
    assert parse_retry_after_s(ci(retry_after=value), now=NOW) == expected


@pytest.mark.parametrize("value", ["soon", "", "3s", "-1", "-0.5", "nan", "Wed, 99 Foo 2030"])
def test_retry_after_garbage_or_negative_is_ignored(value: str) -> None:
    assert parse_retry_after_s({"retry-after": value}, now=NOW) is None
    assert parse_retry_after_s(ci(retry_after=value), now=NOW) is None


def test_retry_after_http_date_in_the_future_is_relative_to_now() -> None:
    when = format_datetime(NOW + timedelta(seconds=30), usegmt=True)
    assert when.endswith("GMT")
    assert parse_retry_after_s({"retry-after": when}, now=NOW) == pytest.approx(30.0)
    assert parse_retry_after_s(ci(retry_after=when), now=NOW) == pytest.approx(30.0)
    # The same header read a little later means a shorter wait: `now` really is the reference.
    later = NOW + timedelta(seconds=10)
    assert parse_retry_after_s(ci(retry_after=when), now=later) == pytest.approx(20.0)


def test_retry_after_http_date_in_the_past_means_no_wait() -> None:
    when = format_datetime(NOW - timedelta(minutes=5), usegmt=True)
    assert parse_retry_after_s({"retry-after": when}, now=NOW) == 0.0
    assert parse_retry_after_s(ci(retry_after=when), now=NOW) == 0.0


def test_retry_after_ms_takes_precedence() -> None:
    assert parse_retry_after_s({"retry-after-ms": "1500", "retry-after": "10"}, now=NOW) == 1.5
    assert parse_retry_after_s(ci(retry_after_ms="1500", retry_after="10"), now=NOW) == 1.5
    assert parse_retry_after_s(ci(retry_after_ms="250"), now=NOW) == 0.25


@pytest.mark.parametrize("bad_ms", ["soon", "-5"])
def test_unusable_retry_after_ms_falls_back_to_retry_after(bad_ms: str) -> None:
    assert parse_retry_after_s(ci(retry_after_ms=bad_ms, retry_after="4"), now=NOW) == 4.0
    assert parse_retry_after_s(ci(retry_after_ms=bad_ms), now=NOW) is None


@pytest.mark.parametrize("headers", [{}, {"content-type": "application/json"}, ci()])
def test_no_retry_after_header(headers: Mapping[str, str]) -> None:
    assert parse_retry_after_s(headers, now=NOW) is None


def test_case_insensitive_lookup_works_through_aiohttp_style_headers() -> None:
    # Servers send all sorts of capitalisations; a CIMultiDict finds them all.
    for name in ("Retry-After", "RETRY-AFTER", "retry-after"):
        headers = CIMultiDictProxy(CIMultiDict({name: "2"}))
        assert parse_retry_after_s(headers, now=NOW) == 2.0


# ----------------------------------------------------------------------------- backoff_delay_s

attempts = st.integers(min_value=1, max_value=80)
bases = st.floats(min_value=0.001, max_value=10.0, allow_nan=False, allow_infinity=False)
caps = st.floats(min_value=0.0, max_value=600.0, allow_nan=False, allow_infinity=False)
retry_afters = st.floats(min_value=0.0, max_value=10_000.0, allow_nan=False, allow_infinity=False)
seeds = st.integers(min_value=0, max_value=2**32)


def ceiling(attempt: int, base_s: float, cap_s: float) -> float:
    return min(cap_s, base_s * 2.0 ** (attempt - 1))


@given(attempt=attempts, base_s=bases, cap_s=caps, seed=seeds)
def test_full_jitter_stays_within_the_exponential_ceiling(
    attempt: int, base_s: float, cap_s: float, seed: int
) -> None:
    delay = backoff_delay_s(attempt, base_s=base_s, cap_s=cap_s, rng=random.Random(seed))
    assert 0.0 <= delay <= ceiling(attempt, base_s, cap_s)


@given(
    attempt=attempts,
    base_s=bases,
    cap_s=caps,
    retry_after_s=retry_afters,
    retry_after_cap_s=caps,
    seed=seeds,
)
def test_retry_after_is_a_floor_up_to_its_cap(
    attempt: int,
    base_s: float,
    cap_s: float,
    retry_after_s: float,
    retry_after_cap_s: float,
    seed: int,
) -> None:
    delay = backoff_delay_s(
        attempt,
        base_s=base_s,
        cap_s=cap_s,
        retry_after_s=retry_after_s,
        retry_after_cap_s=retry_after_cap_s,
        rng=random.Random(seed),
    )
    floor = min(retry_after_s, retry_after_cap_s)
    assert delay >= floor
    assert delay <= max(ceiling(attempt, base_s, cap_s), floor)


def test_retry_after_beyond_its_cap_is_clamped() -> None:
    delay = backoff_delay_s(
        1, base_s=0.1, cap_s=1.0, retry_after_s=86_400.0, retry_after_cap_s=600.0
    )
    assert delay == 600.0


@given(attempt=st.integers(min_value=63, max_value=10**6), seed=seeds)
def test_huge_attempt_numbers_do_not_overflow(attempt: int, seed: int) -> None:
    delay = backoff_delay_s(attempt, base_s=1.0, cap_s=60.0, rng=random.Random(seed))
    assert 0.0 <= delay <= 60.0


def test_attempt_1000_is_capped() -> None:
    delays = [
        backoff_delay_s(1000, base_s=1.0, cap_s=30.0, rng=random.Random(seed)) for seed in range(50)
    ]
    assert all(0.0 <= d <= 30.0 for d in delays)
    assert max(delays) > 15.0  # the cap, not an overflowed ceiling of 0 or inf, bounds the draw


@pytest.mark.parametrize("attempt", [0, -1])
def test_attempts_start_at_one(attempt: int) -> None:
    with pytest.raises(ValueError, match="start at 1"):
        backoff_delay_s(attempt, base_s=1.0, cap_s=60.0)


def test_first_attempt_ceiling_is_base() -> None:
    rng = random.Random(3)
    delays = [backoff_delay_s(1, base_s=0.5, cap_s=60.0, rng=rng) for _ in range(200)]
    assert all(0.0 <= d <= 0.5 for d in delays)
    assert max(delays) > 0.4


def test_full_jitter_spreads_delays() -> None:
    rng = random.Random(20240601)
    delays = [backoff_delay_s(5, base_s=1.0, cap_s=60.0, rng=rng) for _ in range(200)]
    assert all(0.0 <= d <= 16.0 for d in delays)  # ceiling: 1 * 2**4
    assert any(d < 2.0 for d in delays)
    assert any(d > 14.0 for d in delays)
    assert len(set(delays)) == len(delays)  # no lockstep


def test_seeded_rng_is_reproducible() -> None:
    first = [backoff_delay_s(4, base_s=1.0, cap_s=60.0, rng=random.Random(9)) for _ in range(3)]
    second = [backoff_delay_s(4, base_s=1.0, cap_s=60.0, rng=random.Random(9)) for _ in range(3)]
    assert first == second
