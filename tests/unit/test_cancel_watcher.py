"""The worker's CancelWatcher, without I/O: which attempt a cancel request aborts, and when."""

from __future__ import annotations

import asyncio
from typing import Any

from promptq.store import Claim
from worker.cancel import CancelWatcher


def claim(number: int) -> Claim:
    """Attempt `number` of job "j"."""
    return Claim(
        job_id="j", number=number, kind="prompt", model="m", input={}, max_attempts=5, charged=1
    )


def watcher() -> CancelWatcher:
    """A watcher whose Redis and database are never used by these tests."""
    none: Any = None
    return CancelWatcher(none, "q", none)


async def run_attempt(cancels: CancelWatcher, attempt: Claim, started: asyncio.Event) -> str:
    """Wait on a 'model call' inside `cancellable`; say how the attempt ended."""
    try:
        with cancels.cancellable(attempt):
            started.set()
            await asyncio.sleep(30)
    except asyncio.CancelledError:
        return "cancelled" if cancels.consume(attempt) else "stopped"
    return "finished"


async def test_a_request_aborts_the_running_attempt() -> None:
    cancels, started = watcher(), asyncio.Event()
    task = asyncio.create_task(run_attempt(cancels, claim(1), started))
    await started.wait()
    cancels._on_message(b"j:1")
    assert await asyncio.wait_for(task, 5) == "cancelled"


async def test_an_early_request_aborts_the_attempt_once_it_starts() -> None:
    cancels, started = watcher(), asyncio.Event()
    cancels._on_message(b"j:2")  # arrives between the claim and the call
    assert await asyncio.wait_for(run_attempt(cancels, claim(2), started), 5) == "cancelled"


async def test_a_request_for_another_attempt_leaves_this_one_alone() -> None:
    cancels, started = watcher(), asyncio.Event()
    cancels._on_message(b"j:1")  # for the attempt before this one
    task = asyncio.create_task(run_attempt(cancels, claim(2), started))
    await started.wait()
    task.cancel()  # a worker shutdown, not a cancel request
    # Had the request for attempt 1 been taken for this one, it would end "cancelled"
    assert await asyncio.wait_for(task, 5) == "stopped"
