"""How the API stops (SIGTERM, Ctrl-C) without keeping anyone waiting past its grace.

aiohttp stops taking connections, runs `on_shutdown`, then waits up to its shutdown timeout
(`PROMPTQ_API_SHUTDOWN_GRACE_S`) for the requests still running, and cancels what is left.
Most requests take milliseconds; three kinds can wait far longer, and are ended on purpose:

* event streams never end by themselves: a job's (`/api/jobs/{id}/stream`) ends at its next
  look (`stopping`), before its terminal status, and the Python client's `stream()` raises
  ServiceUnavailable; the dashboard's (`/ui/events`) is cancelled at once (`stream`), and
  the browser reconnects;
* chat completions wait for their job's answer (up to `PROMPTQ_CHAT_WAIT_S`): they go on
  waiting until shortly before the grace ends (`answer_by`), then answer 503 naming the job,
  which goes on in the queue (`JobListener.follow` raises `Stopping`).

Nothing is lost: jobs live in SQL and Redis, not in the API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

from promptq.errors import ServiceUnavailable

#: The part of the grace kept for the last answers (at most 1 s, at most half the grace).
ANSWER_MARGIN_S = 1.0


class Stopping(ServiceUnavailable):
    """The API is shutting down before the job finished; the job goes on."""


class Shutdown:
    """The API's stop: when waits must answer by, and the open event streams to close."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        #: monotonic time by which waiting requests answer; None while the API runs.
        self.answer_by: float | None = None
        self._streams: set[asyncio.Task[Any]] = set()

    @property
    def stopping(self) -> bool:
        """The API has begun to stop."""
        return self.answer_by is not None

    def check(self, what: str) -> None:
        """Raise Stopping once the API stops and the time to answer has come."""
        if self.answer_by is not None and time.monotonic() >= self.answer_by:
            raise Stopping(f"the API is shutting down; {what}")

    @contextmanager
    def stream(self) -> Iterator[None]:
        """Run an event stream: it is cancelled when the API starts to stop."""
        task = asyncio.current_task()
        assert task is not None  # aiohttp runs every handler in a task of its own
        self._streams.add(task)
        try:
            yield
        finally:
            self._streams.discard(task)

    def begin(self) -> None:
        """Close the open streams; waits answer within the grace, less a margin."""
        margin_s = min(ANSWER_MARGIN_S, self.grace_s / 2)
        self.answer_by = time.monotonic() + self.grace_s - margin_s
        for task in list(self._streams):
            task.cancel()


SHUTDOWN = web.AppKey("shutdown", Shutdown)


def setup(app: web.Application, grace_s: float) -> None:
    """Give the app its Shutdown, begun by `on_shutdown`."""
    shutdown = app[SHUTDOWN] = Shutdown(grace_s)

    async def begin(_: web.Application) -> None:
        shutdown.begin()

    app.on_shutdown.append(begin)
