"""The queue's Redis scripts keep arq's contract: a job enqueued by script is the job arq would
have stored, a second enqueue of the same id is refused, and the reconciler's state lookup
reports what Redis holds."""

from __future__ import annotations

import asyncio
import socket
from datetime import timedelta

import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.jobs import Job as ArqJob
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from promptq import clock
from promptq.queue import RUN_JOB, QueueClient, deserialize
from promptq.settings import Settings
from tests.conftest import base_settings, wait_for
from worker.finishes import BatchedFinish


@pytest.fixture
async def queue(tmp_path: object, redis_url: str) -> QueueClient:
    settings: Settings = base_settings(tmp_path, "sqlite+aiosqlite://", redis_url=redis_url)
    client = await QueueClient.connect(settings)
    yield client  # type: ignore[misc]
    await client.close()


async def test_an_enqueued_job_is_stored_as_arq_stores_it_and_wakes_workers(
    queue: QueueClient,
) -> None:
    pubsub = queue.redis.pubsub()
    await pubsub.subscribe(queue.wake_channel)
    await pubsub.get_message(timeout=1)  # the subscribe confirmation

    assert await queue.enqueue("job-1", defer_s=30)

    info = await ArqJob(
        "job-1", queue.redis, _queue_name=queue.queue_name, _deserializer=deserialize
    ).info()
    assert info is not None
    assert (info.function, tuple(info.args), info.kwargs) == (RUN_JOB, ("job-1",), {})
    score = await queue.redis.zscore(queue.queue_name, "job-1")
    assert score is not None
    assert 29_000 <= score - info.enqueue_time.timestamp() * 1000 <= 31_000
    async with asyncio.timeout(5):
        while (message := await pubsub.get_message(timeout=1)) is None:
            pass
    assert message["channel"].decode() == queue.wake_channel
    await pubsub.aclose()


async def test_a_second_enqueue_of_the_same_job_is_refused(queue: QueueClient) -> None:
    assert await queue.enqueue("job-1")
    assert not await queue.enqueue("job-1")
    assert await queue.redis.zcard(queue.queue_name) == 1


async def test_states_report_queued_jobs_markers_and_missing_jobs(queue: QueueClient) -> None:
    await queue.enqueue("queued")
    await queue.enqueue("marked")
    await queue.redis.psetex(in_progress_key_prefix + "marked", 60_000, b"1")

    states = await queue.states(["queued", "marked", "missing"])

    assert states["queued"].queued and states["queued"].marker_ttl_s is None
    assert states["queued"].due_at_ms is not None
    marked_ttl_s = states["marked"].marker_ttl_s
    assert states["marked"].queued and marked_ttl_s is not None and 0 < marked_ttl_s <= 60
    assert not states["missing"].queued and states["missing"].due_at_ms is None
    assert await queue.missing(["queued", "missing"]) == ["missing"]


async def test_batched_finishes_clear_what_arq_clears_and_share_a_round_trip(
    queue: QueueClient,
) -> None:
    redis = queue.redis
    ids = [f"done-{i}" for i in range(5)]
    for job_id in ids:
        await queue.enqueue(job_id)
        await redis.psetex(in_progress_key_prefix + job_id, 60_000, b"1")
        await redis.set(retry_key_prefix + job_id, 1)
    await queue.enqueue("still-queued")
    finishes = BatchedFinish(redis, queue.queue_name)

    # When five jobs end at once
    await asyncio.wait_for(asyncio.gather(*(finishes.finish(j) for j in ids)), timeout=5)

    # Then their keys are gone as after arq's finish_job, in one transaction, others untouched
    assert finishes.transactions == 1
    for job_id in ids:
        keys = (job_key_prefix, in_progress_key_prefix, retry_key_prefix)
        assert not await redis.exists(*(prefix + job_id for prefix in keys))
    assert await redis.zrange(queue.queue_name, 0, -1) == [b"still-queued"]


async def test_a_batched_finish_fails_when_redis_does(queue: QueueClient) -> None:
    away = Redis(host="127.0.0.1", port=_free_port(), socket_connect_timeout=1)
    try:
        finishes = BatchedFinish(away, queue.queue_name)
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(finishes.finish("job-1"), timeout=5)
    finally:
        await away.aclose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_move_ahead_moves_a_due_job_only(queue: QueueClient) -> None:
    # Given a job that fell due and one deferred again into the future
    await queue.enqueue("due", defer_s=0.001)
    await queue.enqueue("deferred", defer_s=60)
    before = await queue.redis.zscore(queue.queue_name, "deferred")

    await wait_for(lambda: _due(queue, "due"))
    for job_id in ("due", "deferred", "not-queued"):
        await queue.move_ahead(job_id, priority=10)

    # Then only the due one goes ahead of bulk work (days earlier); nothing is added
    week_ago_ms = (clock.now() - timedelta(days=7)).timestamp() * 1000
    assert (await queue.redis.zscore(queue.queue_name, "due") or 0) < week_ago_ms
    assert await queue.redis.zscore(queue.queue_name, "deferred") == before
    assert await queue.redis.zscore(queue.queue_name, "not-queued") is None


async def _due(queue: QueueClient, job_id: str) -> bool:
    score = await queue.redis.zscore(queue.queue_name, job_id)
    return score is not None and score <= clock.now().timestamp() * 1000


async def test_wake_makes_deferred_jobs_due_at_their_priority_only(queue: QueueClient) -> None:
    # Given a deferred bulk job, a deferred interactive one, one due already, and none
    await queue.enqueue("deferred", defer_s=600)
    await queue.enqueue("deferred-interactive", defer_s=600)
    await queue.enqueue("due")
    due_score = await queue.redis.zscore(queue.queue_name, "due")
    pubsub = queue.redis.pubsub()
    await pubsub.subscribe(queue.wake_channel)
    await pubsub.get_message(timeout=1)  # the subscribe confirmation

    codes = await queue.wake({"deferred": 0, "deferred-interactive": 10, "due": 0, "not-queued": 0})

    # Then the deferred ones are due now (the interactive one days earlier), the due one keeps
    # its place, nothing is added, and idle workers are woken
    assert codes == {"deferred": 1, "deferred-interactive": 1, "due": 0, "not-queued": -1}
    assert await _due(queue, "deferred")
    week_ago_ms = (clock.now() - timedelta(days=7)).timestamp() * 1000
    assert (await queue.redis.zscore(queue.queue_name, "deferred-interactive") or 0) < week_ago_ms
    assert await queue.redis.zscore(queue.queue_name, "due") == due_score
    assert await queue.redis.zscore(queue.queue_name, "not-queued") is None
    async with asyncio.timeout(5):
        while (message := await pubsub.get_message(timeout=1)) is None:
            pass
    assert message["channel"].decode() == queue.wake_channel
    await pubsub.aclose()
