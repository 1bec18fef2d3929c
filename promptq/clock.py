"""The one seam for time and ids, so tests can patch a single place."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime


def now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def new_id() -> str:
    """A time-ordered UUIDv7 string: ids sort by creation time, which keyset pagination uses."""
    unix_ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (unix_ms & (2**48 - 1)) << 80
    value |= 0x7 << 76  # version 7
    value |= ((rand >> 68) & 0xFFF) << 64
    value |= 0b10 << 62  # RFC 4122 variant
    value |= rand & (2**62 - 1)
    return str(uuid.UUID(int=value))
