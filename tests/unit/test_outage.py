"""OutageLog: a failure that repeats every loop turn is a few lines, not one per turn."""

from __future__ import annotations

import logging

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from promptq.outage import OutageLog

LOGGER = logging.getLogger("tests.outage")


def test_a_long_outage_is_one_line_then_a_reminder_a_minute_then_one_on_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a loop failing every 2 s for 3 minutes, then working again
    now = [0.0]
    outage = OutageLog(LOGGER, "reconciler pass", remind_s=60, monotonic=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="tests.outage"):
        for _ in range(90):
            outage.failed(RedisConnectionError("Connection refused"))
            now[0] += 2
        outage.ok()
        outage.ok()

    # Then: the start, a reminder per minute with the count, and the recovery, without tracebacks
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("WARNING", "reconciler pass failed (ConnectionError); retrying"),
        ("WARNING", "reconciler pass failed (ConnectionError) (31 failures in a row); retrying"),
        ("WARNING", "reconciler pass failed (ConnectionError) (61 failures in a row); retrying"),
        ("INFO", "reconciler pass works again after 90 failure(s)"),
    ]
    assert all(r.exc_info is None for r in caplog.records)


def test_an_unexpected_error_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    outage = OutageLog(LOGGER, "cancel subscription")
    with caplog.at_level(logging.WARNING, logger="tests.outage"):
        try:
            raise KeyError("bug")
        except KeyError as exc:
            outage.failed(exc, "re-subscribing")
    (record,) = caplog.records
    assert record.getMessage() == "cancel subscription failed (KeyError('bug')); re-subscribing"
    assert record.exc_info is not None and record.exc_info[0] is KeyError
