"""Interactive work goes ahead of bulk work.

Given 2,000 bulk jobs queued and a worker busy with them against a fake LLM with a fixed
latency, when an interactive request comes in through /v1/chat/completions (once plainly, once
failing its first attempt), then it is answered after only a few more bulk calls, not after
the backlog: arq hands out due jobs in score order and interactive jobs are scored ahead.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from arq.constants import job_key_prefix
from sqlalchemy import update

from promptq import clock
from promptq.chat import ChatService
from promptq.models import Job, JobKind, JobStatus, Priority
from promptq.openai_schemas import parse_chat_request
from promptq.service import JobService
from promptq.testing.fake_llm import FakeLLM
from tests.conftest import ApiStarter, KeyFactory, WorkerFactory, bearer, wait_for
from worker.reconcile import Reconciler

BULK_JOBS = 2000
CONCURRENCY = 4
#: Bulk calls that may reach the model between an interactive request and its call: the slots
#: freeing while it is being queued, a few rounds at most (this test's "a few backend
#: latencies"). Without priority it is the whole backlog.
MAX_BULK_CALLS_MEANWHILE = CONCURRENCY * 4


async def queue_bulk_jobs(service: JobService, count: int) -> None:
    now = clock.now()
    jobs = [
        Job(
            id=clock.new_id(),
            kind=JobKind.PROMPT,
            status=JobStatus.QUEUED,
            model="fake-small",
            input={"messages": [{"role": "user", "content": f"bulk {i}"}], "params": {}},
            attempts=0,
            interruptions=0,
            max_attempts=3,
            attempt_budget=3,
            priority=Priority.BULK,
            created_at=now,
            updated_at=now,
        )
        for i in range(count)
    ]
    async with service.store.sessionmaker() as session, session.begin():
        session.add_all(jobs)
    for job in jobs:
        await service.queue.enqueue(job.id)


def bulk_calls(fake_llm: FakeLLM) -> int:
    return sum(n for p, n in fake_llm.stats.requests_by_prompt.items() if p.startswith("bulk"))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_an_interactive_request_overtakes_two_thousand_bulk_jobs(
    start_api: ApiStarter,
    make_key: KeyFactory,
    service: JobService,
    fake_llm: FakeLLM,
    start_worker: WorkerFactory,
) -> None:
    key = await make_key("interactive")
    api = await start_api(bearer(key))
    fake_llm.config.latency_ms = 50
    await queue_bulk_jobs(service, BULK_JOBS)
    await start_worker(worker_concurrency=CONCURRENCY)
    await wait_for(lambda: _at_least(fake_llm, CONCURRENCY * 2))

    async def ask(content: str) -> int:
        """Send an interactive request; the bulk calls that reached the model after it was
        sent and before its (last) call did."""
        sent_at = len(fake_llm.stats.arrivals)
        body = {"model": "fake-small", "messages": [{"role": "user", "content": content}]}
        async with api.post("/v1/chat/completions", json=body) as response:
            assert response.status == 200, await response.text()
        arrivals = fake_llm.stats.arrivals
        last_call = max(i for i, prompt in enumerate(arrivals) if prompt == content)
        return sum(p.startswith("bulk") for p in arrivals[sent_at:last_call])

    # A plain interactive request, and one whose first attempt fails (its retry keeps its place)
    plain = await ask("interactive now")
    retried = await ask("[[fake: 500, ok]] interactive retried")

    assert plain <= MAX_BULK_CALLS_MEANWHILE, plain
    assert retried <= MAX_BULK_CALLS_MEANWHILE, retried
    assert fake_llm.stats.requests_by_prompt["[[fake: 500, ok]] interactive retried"] == 2
    # And the backlog really was there all along
    assert bulk_calls(fake_llm) < BULK_JOBS / 2


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_an_interactive_retry_frees_its_slot_during_its_backoff(
    start_api: ApiStarter,
    make_key: KeyFactory,
    service: JobService,
    fake_llm: FakeLLM,
    start_worker: WorkerFactory,
) -> None:
    # Given a worker that holds one job at a time, busy with a bulk backlog
    api = await start_api(bearer(await make_key("interactive")))
    latency_ms, backoff_s = 50, 1
    fake_llm.config.latency_ms = latency_ms
    await queue_bulk_jobs(service, 300)
    await start_worker(worker_concurrency=1, worker_prefetch=0)
    await wait_for(lambda: _at_least(fake_llm, 2))

    # When two interactive requests are told to come back in a second (429, Retry-After)
    contents = [f"[[fake: 429:retry_after={backoff_s}, ok]] come back later {n}" for n in (1, 2)]

    async def ask(content: str) -> None:
        body = {"model": "fake-small", "messages": [{"role": "user", "content": content}]}
        async with api.post("/v1/chat/completions", json=body) as response:
            assert response.status == 200, await response.text()

    await asyncio.gather(*(ask(content) for content in contents))

    # Then, while both waited, the worker's one slot ran bulk jobs (neither held it, nor the
    # room the worker keeps for a job that is finishing); and each retry went ahead of the
    # backlog once it was due, not behind the 250-odd jobs still waiting
    arrivals = fake_llm.stats.arrivals
    calls = [[i for i, prompt in enumerate(arrivals) if prompt == c] for c in contents]
    both_waiting = arrivals[max(first for first, _ in calls) : min(second for _, second in calls)]
    assert sum(p.startswith("bulk") for p in both_waiting) >= 2, calls
    most = backoff_s * 1000 // latency_ms  # the backoff over the model's latency
    for first, second in calls:
        assert sum(p.startswith("bulk") for p in arrivals[first:second]) <= most + 4, calls
    assert bulk_calls(fake_llm) < 150


async def _at_least(fake_llm: FakeLLM, calls: int) -> bool:
    return bulk_calls(fake_llm) >= calls


async def bulk_and_interactive_jobs(service: JobService) -> Job:
    """A bulk job queued, then an interactive one written (as /v1/chat/completions would)."""
    await queue_bulk_jobs(service, 1)
    request = parse_chat_request(
        {"model": "fake-small", "messages": [{"role": "user", "content": "x"}]}
    )
    return await ChatService(service).create(request, owner_key_id=None)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_reconciler_requeues_a_lost_interactive_job_ahead_of_bulk_work(
    service: JobService,
) -> None:
    # Given an interactive job and a bulk job that SQL says are queued but Redis has lost
    interactive = await bulk_and_interactive_jobs(service)
    redis = service.queue.redis
    await redis.delete(service.queue.queue_name, *await redis.keys(job_key_prefix + "*"))
    async with service.store.sessionmaker() as session, session.begin():
        await session.execute(update(Job).values(updated_at=clock.now() - timedelta(minutes=1)))

    # When the reconciler runs, both are queued again, the interactive one scored ahead
    await Reconciler(service.store, service.queue, marker_ttl_s=60).run_once()

    scores = dict(
        await service.queue.redis.zrange(service.queue.queue_name, 0, -1, withscores=True)
    )
    assert len(scores) == 2
    now_ms = clock.now().timestamp() * 1000
    interactive_score = scores.pop(interactive.id.encode())
    (bulk_score,) = scores.values()
    assert interactive_score < now_ms - 7 * 24 * 3600 * 1000 < bulk_score


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_reconciler_moves_a_due_interactive_retry_back_ahead_of_bulk_work(
    service: JobService,
) -> None:
    # Given an interactive job retrying, its backoff over, that waits in Redis at its due time
    # (its worker stopped before moving it back ahead), and a bulk job due earlier
    interactive = await bulk_and_interactive_jobs(service)
    backoff_over = clock.now() - timedelta(seconds=30)
    async with service.store.sessionmaker() as session, session.begin():
        await session.execute(update(Job).values(updated_at=clock.now() - timedelta(minutes=1)))
        await session.execute(
            update(Job)
            .where(Job.id == interactive.id)
            .values(status=JobStatus.RETRYING, attempts=1, next_attempt_at=backoff_over)
        )
    await service.queue.enqueue(interactive.id, defer_s=0.001)
    queue = service.queue.queue_name

    async def scores() -> dict[bytes, float]:
        return dict(await service.queue.redis.zrange(queue, 0, -1, withscores=True))

    assert next(iter(await scores())) != interactive.id.encode()  # behind the bulk job

    # When the reconciler runs, it is first in line again; the bulk job stays where it was
    before = await scores()
    await Reconciler(service.store, service.queue, marker_ttl_s=60).run_once()
    after = await scores()
    assert next(iter(after)) == interactive.id.encode()
    assert after[interactive.id.encode()] < clock.now().timestamp() * 1000 - 7 * 24 * 3600 * 1000
    bulk = next(job_id for job_id in after if job_id != interactive.id.encode())
    assert after[bulk] == before[bulk]
