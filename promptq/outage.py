"""How a background loop reports a failure that repeats (Redis or the database away).

A loop that retries every second or two would otherwise write a line (or a traceback) per turn
for as long as an outage lasts: thousands of lines from a few workers in ten minutes, burying
everything else. `OutageLog` writes one WARNING when the failures start, a reminder with the
count at most every `remind_s` while they last, and one INFO line when the loop works again.
A connection error is one line; anything else (a bug) keeps its traceback on the lines it
writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from promptq.db import is_db_unavailable

#: Longest a repeating failure goes without a line saying it still fails.
REMIND_S = 60.0


def is_outage(exc: BaseException) -> bool:
    """True for errors that mean "Redis or the database is away", not "something is wrong"."""
    return isinstance(exc, RedisError | OSError) or is_db_unavailable(exc)


class OutageLog:
    """The log lines of one background loop's failures: start, reminders, recovery."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        remind_s: float = REMIND_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._what = what
        self._remind_s = remind_s
        self._monotonic = monotonic
        #: Failures in a row, and when the last line about them was written.
        self.failures = 0
        self._said_at = 0.0

    def failed(self, exc: BaseException, then: str = "retrying") -> None:
        """One more failure: logged if it is the first, or a reminder is due."""
        self.failures += 1
        now = self._monotonic()
        if self.failures > 1 and now - self._said_at < self._remind_s:
            return
        self._said_at = now
        count = "" if self.failures == 1 else f" ({self.failures} failures in a row)"
        self._logger.warning(
            "%s failed (%s)%s; %s",
            self._what,
            exc.__class__.__name__ if is_outage(exc) else repr(exc),
            count,
            then,
            exc_info=None if is_outage(exc) else exc,
        )

    def ok(self) -> None:
        """It worked: say so once, if it had been failing."""
        if self.failures:
            self._logger.info("%s works again after %d failure(s)", self._what, self.failures)
            self.failures = 0
