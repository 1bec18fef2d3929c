"""Global limits inside real workers: routing by model, waiting without hogging slots,
adaptive concurrency, summarize calls inside the limits (SQLite: the database is not the point).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from redis.asyncio import Redis

from promptq.limits import RedisLimits
from promptq.models import JobStatus
from promptq.schemas import PromptJobCreate, SummarizeJobCreate
from promptq.service import JobService
from promptq.settings import Settings
from promptq.testing.fake_llm import FakeLLM
from tests.conftest import WorkerFactory, wait_for, wait_terminal

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def prompt(content: str, model: str, **extra: Any) -> PromptJobCreate:
    return PromptJobCreate.model_validate(
        {"kind": "prompt", "model": model, "messages": [{"role": "user", "content": content}]}
        | extra
    )


def endpoints(fake: FakeLLM, models: str, **limits: Any) -> str:
    return json.dumps(
        [{"name": "limited", "models": [models], "base_url": fake.base_url, "limits": limits}]
    )


async def scope_state(settings: Settings, scope: str = "limited") -> Any:
    redis = Redis.from_url(settings.redis_url)
    try:
        return await RedisLimits(redis, settings.queue_name).state(scope)
    finally:
        await redis.aclose()


async def test_jobs_waiting_on_one_model_leave_slots_to_another(
    settings: Settings, service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given model-a limited to one call at a time, each call taking 1.5 s, and a worker of 3
    # slots; five model-a jobs are queued before six model-b jobs (no limits). Were waiting
    # jobs to hold their slots, no model-b job could start before the third model-a job had
    # finished (two slots would be held by waiting model-a jobs until then).
    worker = await start_worker(
        worker_concurrency=3,
        endpoints=endpoints(fake_llm, "model-a", max_in_flight=1),
    )
    slow = [
        (await service.submit(prompt(f"a{i} [[fake: sleep:1500]]", "model-a")))[0].id
        for i in range(5)
    ]
    fast = [(await service.submit(prompt(f"b{i}", "model-b")))[0].id for i in range(6)]

    # When the model-b jobs are done
    await wait_terminal(service.store, fast, timeout_s=20)

    # Then most model-a jobs are still waiting: they did not hold the slots
    states = await service.store.get_states(slow)
    assert sum(s.status != JobStatus.SUCCEEDED for s in states.values()) >= 3
    assert all(
        s.status == JobStatus.SUCCEEDED for s in (await service.store.get_states(fast)).values()
    )
    await wait_terminal(service.store, slow, timeout_s=20)
    states = await service.store.get_states(slow)
    # every model-a job succeeded with one attempt: waiting is never charged or recorded
    assert {(s.status, s.attempts) for s in states.values()} == {(JobStatus.SUCCEEDED, 1)}
    for job_id in slow:
        assert len(await service.store.list_attempts(job_id)) == 1
    assert (await scope_state(settings)).in_flight == 0

    # The worker's Prometheus metrics show the limit, its calls in flight and the waits
    metrics = worker.ctx["metrics"]
    await metrics.refresh()
    text = metrics.render().decode()
    assert 'promptq_limit_in_flight{limit="limited"} 0.0' in text
    assert 'promptq_adaptive_limit{limit="limited"} 1.0' in text
    waits = [line for line in text.splitlines() if line.startswith("promptq_limiter_waits_total")]
    assert waits and float(waits[0].split()[-1]) >= 1


async def test_adaptive_limit_converges_under_a_hidden_capacity(
    settings: Settings, service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a backend that answers 429 beyond 4 calls at once, and an adaptive limit in 1..12
    # that starts well above that
    capacity = 4
    fake_llm.config.capacity = capacity
    fake_llm.config.latency_ms = 150
    limits = {"max_in_flight": 12, "initial_in_flight": 10, "decrease_factor": 0.8}
    await start_worker(
        worker_concurrency=12,
        endpoints=endpoints(fake_llm, "*", adaptive=True, **limits),
    )
    # When 80 jobs run
    ids = [
        (await service.submit(prompt(f"p{i}", "fake-small", max_attempts=30)))[0].id
        for i in range(80)
    ]
    await wait_terminal(service.store, ids, timeout_s=60)

    # Then every job succeeded, the limit came down, and the calls it lets through at once
    # ended near the capacity (one overload per window is tolerated, so it hovers just above)
    states = await service.store.get_states(ids)
    assert {s.status for s in states.values()} == {JobStatus.SUCCEEDED}
    state = await scope_state(settings)
    assert fake_llm.stats.responses_by_status.get(429, 0) >= 1
    assert state.decreases >= 1
    assert state.adaptive_limit is not None
    assert capacity - 2 <= int(state.adaptive_limit) <= capacity + 2


async def test_summarize_map_calls_stay_inside_the_limit(
    settings: Settings, service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a fan-out of 4 per job but a global limit of 2 calls in flight
    fake_llm.config.latency_ms = 50
    await start_worker(
        worker_concurrency=4,
        summary_fanout=4,
        endpoints=endpoints(fake_llm, "*", max_in_flight=2),
    )
    document = "\n\n".join(f"Paragraph {i}. " + "word " * 300 for i in range(12))
    request = SummarizeJobCreate.model_validate(
        {"kind": "summarize", "document": document, "context_window": 1024}
    )
    ids = [(await service.submit(request))[0].id for _ in range(2)]
    await wait_terminal(service.store, ids, timeout_s=60)
    states = await service.store.get_states(ids)
    assert {s.status for s in states.values()} == {JobStatus.SUCCEEDED}
    # several map calls per job, never more than 2 at once across both jobs
    assert fake_llm.stats.total_requests > 2 * 3
    assert fake_llm.stats.peak_in_flight <= 2

    async def released() -> bool:
        return bool((await scope_state(settings)).in_flight == 0)

    await wait_for(released, timeout_s=5)


async def test_prefetched_jobs_hold_no_permits(
    settings: Settings, service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given model-a limited to 4 calls at once, shared by two workers: A (2 slots, 2 more jobs
    # prefetched) runs two 5 s calls and holds two more jobs waiting for its slots
    limited = endpoints(fake_llm, "model-a", max_in_flight=4)
    a = await start_worker(worker_concurrency=2, worker_prefetch=2, endpoints=limited)
    long_a = [
        (await service.submit(prompt(f"a{i} [[fake: sleep:5000]]", "model-a")))[0].id
        for i in range(2)
    ]
    await fake_llm.wait_for_requests(2)
    short_a = [(await service.submit(prompt(f"a{i}", "model-a")))[0].id for i in range(2, 4)]

    async def a_prefetched() -> bool:
        return bool(a.ctx["slots"].waiting == 2)

    await wait_for(a_prefetched, timeout_s=10)

    # When worker B (2 slots) starts and two more model-a jobs come
    await start_worker(worker_concurrency=2, worker_prefetch=0, endpoints=limited)
    b_jobs = [
        (await service.submit(prompt(f"b{i} [[fake: sleep:1000]]", "model-a")))[0].id
        for i in range(2)
    ]

    # Then they reach the model while A's long calls still run: A's waiting jobs took no
    # permits, so the four calls the limit allows are all made
    async def four_at_the_model() -> bool:
        return fake_llm.stats.in_flight == 4

    await wait_for(four_at_the_model, timeout_s=3.5)
    assert (await scope_state(settings)).in_flight == 4
    states = await service.store.get_states(long_a)
    assert {s.status for s in states.values()} == {JobStatus.RUNNING}

    every = long_a + short_a + b_jobs
    await wait_terminal(service.store, every, timeout_s=20)
    states = await service.store.get_states(every)
    assert {(s.status, s.attempts) for s in states.values()} == {(JobStatus.SUCCEEDED, 1)}
    assert fake_llm.stats.peak_in_flight == 4
    assert (await scope_state(settings)).in_flight == 0
