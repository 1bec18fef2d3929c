"""ResilientWorker's guards around arq's poll loop, with a Redis stand-in that fails on demand.

Given a worker whose Redis connection breaks, when arq's poll loop hits the error, then the
worker backs off instead of exiting and gives back the job slot arq had taken.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from arq import func
from redis.exceptions import ConnectionError as RedisConnectionError

from worker import resilient
from worker.resilient import ResilientWorker


class BrokenRedis:
    """Every Redis call raises ConnectionError, as while Redis restarts."""

    def __init__(self) -> None:
        self.calls = 0

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise RedisConnectionError("Connection refused")

    async def zrangebyscore(self, *args: Any, **kwargs: Any) -> Any:
        return self._fail()

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        return self._fail()


async def noop(ctx: dict[str, Any]) -> None:
    """A job function the worker never gets to run."""


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> ResilientWorker:
    monkeypatch.setattr(resilient, "RECONNECT_CAP_S", 0.01)
    w = ResilientWorker(functions=[func(noop, name="noop")], handle_signals=False, max_jobs=3)
    w._pool = BrokenRedis()
    return w


async def test_a_redis_error_in_the_poll_loop_backs_off_instead_of_raising(
    worker: ResilientWorker,
) -> None:
    await worker._poll_iteration()
    await worker._poll_iteration()

    assert worker._failures == 2
    assert worker.pool.calls == 2


async def test_a_redis_error_while_starting_a_job_gives_the_slot_back(
    worker: ResilientWorker,
) -> None:
    with pytest.raises(RedisConnectionError):
        await worker.start_jobs([b"job-1", b"job-2"])

    assert worker.job_counter == 0
    assert worker.sem._value == worker.max_jobs + 1  # every permit is back


async def test_a_job_this_worker_runs_is_not_started_twice(worker: ResilientWorker) -> None:
    running = asyncio.get_running_loop().create_future()
    worker.tasks["job-1"] = running  # type: ignore[assignment]

    await worker.start_jobs([b"job-1"])  # would raise if it reached Redis

    assert worker.pool.calls == 0 and worker.job_counter == 0
    running.cancel()


async def test_a_slot_is_given_back_even_if_other_jobs_ended_meanwhile(
    worker: ResilientWorker,
) -> None:
    worker.job_counter = 2  # two jobs running, holding two permits
    for _ in range(2):
        await worker.sem.acquire()

    def end_a_job_then_fail(*args: Any, **kwargs: Any) -> Any:
        worker._release_sem_dec_counter_on_complete()  # a running job ends meanwhile
        raise RedisConnectionError("Connection refused")

    worker.pool.pipeline = end_a_job_then_fail  # type: ignore[method-assign]
    with pytest.raises(RedisConnectionError):
        await worker.start_jobs([b"job-3"])

    assert worker.job_counter == 1  # the job still running
    assert worker.sem._value == worker.max_jobs + 1 - 1
