"""Retry policy: which failures are worth another attempt, and how long to wait before it."""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime

from promptq import clock

#: Statuses that say "not now" rather than "never": timeout, conflict, rate limit, server error.
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429})


def is_transient_status(status: int) -> bool:
    """True for HTTP statuses worth retrying unchanged: 408, 409, 425, 429 and every 5xx."""
    return status in TRANSIENT_STATUSES or 500 <= status <= 599


def parse_retry_after_s(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """Seconds to wait per `retry-after-ms` or `Retry-After` (seconds or an HTTP date), or None."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value_ms = float(raw_ms)
        except ValueError:
            value_ms = -1.0
        if value_ms >= 0:
            return value_ms / 1000.0
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        value_s = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        return max(0.0, (when - (now or clock.now())).total_seconds())
    return value_s if value_s >= 0 else None


def backoff_delay_s(
    attempt: int,
    *,
    base_s: float,
    cap_s: float,
    retry_after_s: float | None = None,
    retry_after_cap_s: float = 600.0,
    rng: random.Random | None = None,
) -> float:
    """Delay before the attempt after `attempt` (1-based): full jitter, at least Retry-After.

    Full jitter draws uniformly from [0, min(cap, base * 2**(attempt-1))], which spreads out a
    burst of failures instead of retrying them in lockstep. A server's Retry-After is a floor.
    """
    if attempt < 1:
        raise ValueError("attempt numbers start at 1")
    ceiling_s = min(cap_s, base_s * 2 ** min(attempt - 1, 62))
    delay_s = (rng or random).uniform(0.0, ceiling_s)
    if retry_after_s is not None:
        delay_s = max(delay_s, min(retry_after_s, retry_after_cap_s))
    return delay_s
