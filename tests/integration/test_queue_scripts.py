"""The queue's Redis scripts keep arq's contract: a job enqueued by script is the job arq would
have stored, a second enqueue of the same id is refused, and the reconciler's state lookup
reports what Redis holds."""

from __future__ import annotations

import asyncio

import pytest
from arq.constants import in_progress_key_prefix
from arq.jobs import Job as ArqJob

from promptq.queue import RUN_JOB, QueueClient, deserialize
from promptq.settings import Settings
from tests.conftest import base_settings


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
