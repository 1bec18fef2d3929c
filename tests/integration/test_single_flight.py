"""Single flight: identical requests in flight make one model call between them.

Given the real API, store, queue and worker on SQLite and PostgreSQL, and the fake LLM, when
a request that may reuse an answer repeats one still queued or running, then it is written
as that job's follower (`cached_from`, queued), the model is called once for the pair, and
the follower ends with the leader's answer and 0 attempts. When a leader fails or is
cancelled, one of its followers makes its own call and the others wait for its answer; another
key's request, a non-deterministic one, and a chat completion never follow.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import update

from promptq import clock, single_flight
from promptq.batch_items import ItemSpec
from promptq.batches import INSERT_CHUNK, BatchService
from promptq.chat import ChatService
from promptq.models import AttemptOutcome, Job, JobKind, JobStatus, Priority
from promptq.openai_schemas import ChatCompletionRequest
from promptq.schemas import PromptJobCreate, SummarizeJobCreate, job_create_adapter
from promptq.service import JobService
from promptq.single_flight import RECHECK_MAX_S, RECHECK_MIN_S, Following, recheck_s
from promptq.store import AttemptResult, Claim
from promptq.testing.fake_llm import FakeLLM
from tests.conftest import (
    ApiClient,
    ApiStarter,
    KeyFactory,
    WorkerFactory,
    bearer,
    wait_terminal,
)
from tests.integration.test_cache import prompt, submit

Client = TestClient[web.Request, web.Application]


DETERMINISTIC = {"temperature": 0}


@pytest.fixture
async def key(make_key: KeyFactory) -> str:
    return await make_key("single-flight-user")


@pytest.fixture
async def api(start_api: ApiStarter, key: str) -> ApiClient:
    return await start_api(bearer(key))


async def get(api: Client, job_id: str) -> dict[str, Any]:
    async with api.get(f"/api/jobs/{job_id}") as response:
        assert response.status == 200, await response.text()
        job: dict[str, Any] = await response.json()
        return job


async def html(api: Client, job_id: str) -> str:
    """The dashboard's page of a job."""
    async with api.get(f"/jobs/{job_id}") as response:
        assert response.status == 200, await response.text()
        return await response.text()


async def test_a_repeat_of_a_queued_job_waits_for_its_answer(
    api: ApiClient,
    start_api: ApiStarter,
    make_key: KeyFactory,
    service: JobService,
    fake_llm: FakeLLM,
    start_worker: WorkerFactory,
) -> None:
    # Given a deterministic job still queued (no worker yet)
    body = prompt("one call for both", params=DETERMINISTIC)
    leader = await submit(api, body)

    # When the same key sends it again, and others send near-misses
    follower = await submit(api, body)
    other_key = await start_api(bearer(await make_key("another-tenant")))
    strangers = [
        await submit(other_key, body),
        await submit(api, body | {"cache": False}),
        await submit(api, prompt("one call for both")),  # not deterministic
    ]

    # Then the repeat waits for the first, and the others run on their own
    assert follower["status"] == "queued" and follower["cached_from"] == leader["id"]
    assert all(job["cached_from"] is None for job in strangers)
    assert f'waits for the answer of</dt><dd><a href="/jobs/{leader["id"]}"' in await html(
        api, follower["id"]
    )

    await start_worker()
    ids = [leader["id"], follower["id"], *(job["id"] for job in strangers)]
    await wait_terminal(service.store, ids)
    first, repeat = await get(api, leader["id"]), await get(api, follower["id"])
    assert first["status"] == repeat["status"] == "succeeded"
    assert repeat["result"] == first["result"] and repeat["usage"] == first["usage"]
    assert repeat["cached_from"] == first["id"] and repeat["attempts"] == 0
    assert "cached from</dt>" in await html(api, follower["id"])
    assert first["attempts"] == 1
    assert fake_llm.stats.total_requests == 1 + len(strangers)
    async with api.get(f"/api/jobs/{follower['id']}/attempts") as response:
        assert (await response.json())["attempts"] == []


async def test_identical_requests_sent_at_the_same_moment_make_one_call(
    api: ApiClient, service: JobService, fake_llm: FakeLLM, start_worker: WorkerFactory
) -> None:
    # Given 40 identical deterministic requests sent all at once (no worker yet)
    body = prompt("all at once", params=DETERMINISTIC)
    jobs = await asyncio.gather(*(submit(api, body) for _ in range(40)))

    # Then one of them leads and the others wait for its answer
    leaders = [job for job in jobs if job["cached_from"] is None]
    assert len(leaders) == 1, [job["cached_from"] for job in jobs]
    assert all(job["cached_from"] == leaders[0]["id"] for job in jobs if job is not leaders[0])

    # And once a worker runs, the model is called once, and every job has its answer
    await start_worker()
    await wait_terminal(service.store, [job["id"] for job in jobs])
    assert fake_llm.stats.total_requests == 1
    results = {(await get(api, job["id"]))["result"] for job in jobs}
    assert len(results) == 1 and None not in results


async def test_identical_batch_items_make_one_call_each(
    api: ApiClient, service: JobService, fake_llm: FakeLLM, start_worker: WorkerFactory
) -> None:
    # Given a job in flight, and a batch that repeats it and itself
    queued = await submit(api, prompt("alpha", params=DETERMINISTIC))
    items = [
        prompt("alpha", params=DETERMINISTIC, custom_id="alpha-again"),
        prompt("beta", params=DETERMINISTIC, custom_id="beta-1"),
        prompt("beta", params=DETERMINISTIC, custom_id="beta-2"),
        prompt("beta", params=DETERMINISTIC, custom_id="beta-3"),
        prompt("gamma", custom_id="gamma-1"),  # not deterministic: each calls the model
        prompt("gamma", custom_id="gamma-2"),
    ]
    async with api.post("/api/batches", json={"jobs": items}) as response:
        assert response.status == 201, await response.text()
        batch = await response.json()

    # Then the repeats follow: alpha the queued job, beta-2/3 the first beta
    assert batch["created"] == 6 and batch["following"] == 3 and batch["cached"] == 0
    await start_worker()
    async with api.get(f"/api/jobs?batch_id={batch['id']}&limit=10") as response:
        jobs = {job["custom_id"]: job for job in (await response.json())["jobs"]}
    assert len(jobs) == len(items)
    await wait_terminal(service.store, [queued["id"], *(job["id"] for job in jobs.values())])
    done = {custom_id: await get(api, job["id"]) for custom_id, job in jobs.items()}
    alpha = await get(api, queued["id"])
    assert done["alpha-again"]["cached_from"] == alpha["id"]
    assert done["alpha-again"]["result"] == alpha["result"]
    assert done["beta-1"]["attempts"] == 1 and done["beta-1"]["cached_from"] is None
    for repeat in ("beta-2", "beta-3"):
        assert done[repeat]["cached_from"] == done["beta-1"]["id"]
        assert done[repeat]["result"] == done["beta-1"]["result"]
        assert done[repeat]["attempts"] == 0
    assert all(done[g]["attempts"] == 1 for g in ("gamma-1", "gamma-2"))
    # alpha, beta and gamma twice
    assert fake_llm.stats.total_requests == 4

    # And the batch's usage tells the reused answers and their tokens from the rest
    async with api.get(f"/api/batches/{batch['id']}") as response:
        usage = (await response.json())["usage"]

    def tokens(job: dict[str, Any]) -> int:
        return int(job["usage"]["prompt_tokens"] + job["usage"]["completion_tokens"])

    reused = ("alpha-again", "beta-2", "beta-3")
    assert usage["reused_answers"] == len(reused)
    assert usage["reused_tokens"] == sum(tokens(done[c]) for c in reused) > 0
    assert usage["total_tokens"] == sum(tokens(job) for job in done.values())


@pytest.fixture
def looking_late(monkeypatch: pytest.MonkeyPatch) -> None:
    """Followers put back look at their leader again only in ten minutes: only the waker
    (worker.followers) brings them back sooner."""
    monkeypatch.setattr(single_flight, "RECHECK_MIN_S", 600.0)
    monkeypatch.setattr(single_flight, "RECHECK_MAX_S", 600.0)


@pytest.mark.usefixtures("looking_late")
async def test_a_follower_is_woken_when_its_leader_is_done(
    api: ApiClient, service: JobService, fake_llm: FakeLLM, start_worker: WorkerFactory
) -> None:
    # Given followers that would look at their leader again only in ten minutes, of a leader
    # that takes a while, and of one that fails
    fake_llm.config.latency_ms = 1500
    slow = prompt("slow to answer", params=DETERMINISTIC)
    failing = prompt("[[fake: 400]] slow to refuse", params=DETERMINISTIC)
    leaders = [await submit(api, slow), await submit(api, failing)]
    followers = [await submit(api, slow), await submit(api, failing)]
    assert [job["cached_from"] for job in followers] == [job["id"] for job in leaders]

    # When a worker runs them all at once
    await start_worker(concurrency=4)
    await wait_terminal(service.store, [job["id"] for job in leaders + followers])

    # Then each follower was woken when its leader was done (long before it would have looked
    # again: the first was put back for ten minutes), the first took the answer, with nothing
    # left due, the second the refusal
    row = await service.store.get_job(followers[0]["id"])
    assert row is not None and row.finished_at is not None and row.next_attempt_at is None
    assert row.finished_at < row.created_at + timedelta(minutes=5)
    answered, refused = [await get(api, job["id"]) for job in followers]
    assert answered["status"] == "succeeded" and answered["attempts"] == 0
    assert answered["result"] == (await get(api, leaders[0]["id"]))["result"]
    assert refused["status"] == "failed" and refused["attempts"] == 0
    refusal = await service.store.get_job(followers[1]["id"])
    assert refusal is not None and refusal.finished_at is not None
    assert refusal.finished_at < refusal.created_at + timedelta(minutes=5)
    assert fake_llm.stats.total_requests == 2


async def test_a_follower_runs_itself_unless_its_leader_was_refused(
    api: ApiClient, service: JobService, fake_llm: FakeLLM, start_worker: WorkerFactory
) -> None:
    # Given three followers: of a job that is then cancelled, of a job that runs out of retries
    # (a 500 on its only attempt), and of a job the model refuses (a 400)
    cancelled = await submit(api, prompt("cancelled first", params=DETERMINISTIC))
    after_cancel = await submit(api, prompt("cancelled first", params=DETERMINISTIC))
    async with api.post(f"/api/jobs/{cancelled['id']}/cancel") as response:
        assert response.status == 200, await response.text()
    flaky = prompt("[[fake: 500, ok]] out of retries", params=DETERMINISTIC)
    exhausted = await submit(api, flaky | {"max_attempts": 1})
    after_exhausted = await submit(api, flaky)
    failing = prompt("[[fake: 400]] refused", params=DETERMINISTIC)
    refused = await submit(api, failing)
    after_refusal = await submit(api, failing)
    assert after_cancel["cached_from"] == cancelled["id"]
    assert after_exhausted["cached_from"] == exhausted["id"]
    assert after_refusal["cached_from"] == refused["id"]

    # When the workers get to them
    await start_worker()
    ids = [after_cancel, exhausted, after_exhausted, refused, after_refusal]
    await wait_terminal(service.store, [job["id"] for job in ids])

    # Then the followers of the cancelled and the exhausted job made their own calls, with no
    # leader named any more
    for follower in (after_cancel, after_exhausted):
        ran = await get(api, follower["id"])
        assert ran["status"] == "succeeded" and ran["attempts"] == 1 and ran["cached_from"] is None
    assert (await get(api, exhausted["id"]))["status"] == "failed"
    # And the follower of the refused job failed with its refusal, without a call
    leader = await get(api, refused["id"])
    tried = await get(api, after_refusal["id"])
    assert leader["status"] == tried["status"] == "failed" and tried["attempts"] == 0
    assert (tried["error"], tried["error_code"]) == (leader["error"], leader["error_code"])
    assert tried["cached_from"] == refused["id"]
    assert f'refused like</dt><dd><a href="/jobs/{refused["id"]}"' in await html(
        api, after_refusal["id"]
    )
    assert fake_llm.stats.total_requests == 4  # the two leaders that ran, and two followers


@pytest.mark.usefixtures("looking_late")
async def test_one_follower_calls_for_all_when_their_leader_gets_no_answer(
    api: ApiClient, service: JobService, fake_llm: FakeLLM, start_worker: WorkerFactory
) -> None:
    # Given five followers, which would look at their leader again only in ten minutes, of a
    # leader that runs out of retries after a while (the model answers when asked again)
    fake_llm.config.latency_ms = 1000
    body = prompt("[[fake: 500, ok]] failed first", params=DETERMINISTIC)
    leader = await submit(api, body | {"max_attempts": 1})
    followers = [await submit(api, body) for _ in range(5)]
    assert all(job["cached_from"] == leader["id"] for job in followers)

    # When a worker runs them all at once
    await start_worker(concurrency=8)
    await wait_terminal(service.store, [leader["id"], *(job["id"] for job in followers)])

    # Then after the leader's failure one follower made the one call for all, and the others
    # (woken when the leader was done, then again when the follower was) took its answer
    assert (await get(api, leader["id"]))["status"] == "failed"
    done = [await get(api, job["id"]) for job in followers]
    ran = [job for job in done if job["attempts"] == 1]
    assert len(ran) == 1 and ran[0]["cached_from"] is None, done
    for job in done:
        assert job["status"] == "succeeded" and job["result"] == ran[0]["result"]
        if job is not ran[0]:
            assert job["attempts"] == 0 and job["cached_from"] == ran[0]["id"]
    assert fake_llm.stats.total_requests == 2


async def test_chat_completions_never_follow(service: JobService) -> None:
    body = prompt("asked on the line", params=DETERMINISTIC)
    queued, _ = await service.submit(service_request(body))
    request = ChatCompletionRequest.model_validate(
        {"model": queued.model, "messages": body["messages"], "temperature": 0}
    )
    chat = await ChatService(service).create(request, owner_key_id=None)
    assert chat.status == JobStatus.QUEUED and chat.cached_from is None
    # while a bulk job does follow it
    bulk, _ = await service.submit(service_request(body))
    assert bulk.cached_from == queued.id


def service_request(body: dict[str, Any]) -> PromptJobCreate | SummarizeJobCreate:
    return job_create_adapter.validate_python(body)


# -- the claim, on the store ---------------------------------------------------------------


async def create(service: JobService, content: str, **extra: Any) -> str:
    job, _ = await service.submit(service_request(prompt(content, params=DETERMINISTIC)), **extra)
    return job.id


async def test_the_claim_of_a_follower_waits_answers_or_runs(service: JobService) -> None:
    store = service.store
    leader_id = await create(service, "claimed in turn")
    follower_id = await create(service, "claimed in turn")

    # While the leader is queued, then running: the follower is not claimed, and looks again
    for step in ("queued", "running"):
        before = clock.now()
        waiting = await store.claim(follower_id, worker="w", lease_s=30)
        assert isinstance(waiting, Following), step
        assert waiting.leader_id == leader_id
        assert RECHECK_MIN_S <= waiting.retry_in_s <= RECHECK_MAX_S
        job = await store.get_job(follower_id)
        assert job is not None and job.status == JobStatus.QUEUED and job.attempts == 0
        assert job.next_attempt_at is not None
        assert job.next_attempt_at >= before + timedelta(seconds=waiting.retry_in_s)
        if step == "queued":
            claim = await store.claim(leader_id, worker="w", lease_s=30)
            assert isinstance(claim, Claim)

    # Once it succeeded: the follower takes its answer, with no attempt of its own
    await store.finish_attempt(
        claim,
        AttemptResult(
            outcome=AttemptOutcome.SUCCEEDED,
            latency_ms=5,
            result="the leader's answer",
            prompt_tokens=3,
            completion_tokens=4,
        ),
        job_status=JobStatus.SUCCEEDED,
    )
    assert await store.claim(follower_id, worker="w", lease_s=30) is None
    job = await store.get_job(follower_id)
    assert job is not None and job.status == JobStatus.SUCCEEDED
    assert (job.result, job.prompt_tokens, job.completion_tokens) == ("the leader's answer", 3, 4)
    assert job.cached_from == leader_id and job.attempts == 0
    assert job.next_attempt_at is None and job.lease_expires_at is None
    assert await store.list_attempts(follower_id) == []
    # and a later repeat is a plain cache hit of the job that ran
    hit, _ = await service.submit(service_request(prompt("claimed in turn", params=DETERMINISTIC)))
    assert hit.status == JobStatus.SUCCEEDED and hit.cached_from == leader_id


async def cancel_leader_of(service: JobService, content: str, followers: int) -> list[str]:
    """A leader cancelled while `followers` identical jobs wait for it: their ids."""
    leader_id = await create(service, content)
    follower_ids = [await create(service, content) for _ in range(followers)]
    async with service.store.sessionmaker() as session, session.begin():
        await session.execute(
            update(Job)
            .where(Job.id == leader_id)
            .values(status=JobStatus.CANCELLED, finished_at=clock.now())
        )
    jobs = [await service.store.get_job(job_id) for job_id in follower_ids]
    assert all(job is not None and job.cached_from == leader_id for job in jobs)
    return follower_ids


async def cached_from(service: JobService, job_id: str) -> str | None:
    job = await service.store.get_job(job_id)
    assert job is not None
    return job.cached_from


async def test_a_follower_claimed_without_an_answer_leads_the_others(service: JobService) -> None:
    store = service.store
    # Given the followers of a cancelled interactive leader: two bulk ones still waiting, an
    # interactive one (more urgent than they are), and a cancelled one
    first, second, third, urgent, gone = await cancel_leader_of(service, "led anew", 5)
    leader_id = await cached_from(service, first)
    async with store.sessionmaker() as session, session.begin():
        await session.execute(
            update(Job).where(Job.id.in_([leader_id, urgent])).values(priority=Priority.INTERACTIVE)
        )
        await session.execute(update(Job).where(Job.id == gone).values(status=JobStatus.CANCELLED))

    # When the first is claimed, then it runs, and the bulk ones wait for it instead
    claim = await store.claim(first, worker="w", lease_s=30)
    assert isinstance(claim, Claim) and claim.job_id == first
    assert await cached_from(service, first) is None
    assert [await cached_from(service, job_id) for job_id in (second, third)] == [first] * 2
    waiting = await store.claim(second, worker="w", lease_s=30)
    assert isinstance(waiting, Following) and waiting.leader_id == first
    # but not the urgent one (it never waits for a less urgent job), nor the cancelled one
    assert [await cached_from(service, job_id) for job_id in (urgent, gone)] == [leader_id] * 2
    assert isinstance(await store.claim(urgent, worker="w", lease_s=30), Claim)

    # And when the first runs out of retries, the next one claimed leads the last in turn
    await store.finish_attempt(
        claim,
        AttemptResult(outcome=AttemptOutcome.TRANSIENT_ERROR, latency_ms=5, error="HTTP 503"),
        job_status=JobStatus.FAILED,
    )
    second_claim = await store.claim(second, worker="w", lease_s=30)
    assert isinstance(second_claim, Claim)
    assert await cached_from(service, third) == second
    waiting = await store.claim(third, worker="w", lease_s=30)
    assert isinstance(waiting, Following) and waiting.leader_id == second

    # And when the model refuses that one's request, the last one takes the refusal: no call
    await store.finish_attempt(
        second_claim,
        AttemptResult(
            outcome=AttemptOutcome.PERMANENT_ERROR,
            latency_ms=5,
            status_code=400,
            error="HTTP 400: bad request",
            error_code="http_400",
        ),
        job_status=JobStatus.FAILED,
    )
    assert await store.claim(third, worker="w", lease_s=30) is None
    refused = await store.get_job(third)
    assert refused is not None and refused.status == JobStatus.FAILED
    assert (refused.attempts, refused.cached_from) == (0, second)
    assert (refused.error, refused.error_code) == ("HTTP 400: bad request", "http_400")
    assert refused.next_attempt_at is None and refused.finished_at is not None


async def test_followers_claimed_at_once_without_an_answer_make_one_call(
    service: JobService,
) -> None:
    # Given eight followers of a cancelled leader
    follower_ids = await cancel_leader_of(service, "all claimed at once", 8)

    # When they are all claimed at the same moment
    claims = await asyncio.gather(
        *(service.store.claim(job_id, worker="w", lease_s=30) for job_id in follower_ids)
    )

    # Then one runs, and the others wait for it (none for itself, none for another waiting one)
    ran = [claim for claim in claims if isinstance(claim, Claim)]
    assert len(ran) == 1, claims
    new_leader = ran[0].job_id
    for job_id, claim in zip(follower_ids, claims, strict=True):
        if job_id != new_leader:
            assert isinstance(claim, Following) and claim.leader_id == new_leader
            assert await cached_from(service, job_id) == new_leader
    assert await cached_from(service, new_leader) is None


async def test_an_old_follower_looks_again_before_its_deadline(service: JobService) -> None:
    # Given a follower that has waited long (it would look again in RECHECK_MAX_S) but has
    # a deadline ten seconds away
    await create(service, "nearly too late")
    body = prompt("nearly too late", params=DETERMINISTIC, deadline_s=10)
    follower, _ = await service.submit(service_request(body))
    assert follower.cached_from is not None
    async with service.store.sessionmaker() as session, session.begin():
        await session.execute(
            update(Job)
            .where(Job.id == follower.id)
            .values(created_at=clock.now() - timedelta(minutes=10))
        )
    assert recheck_s(600) == RECHECK_MAX_S

    # When it is claimed, then it looks again well before the deadline
    waiting = await service.store.claim(follower.id, worker="w", lease_s=30)
    assert isinstance(waiting, Following)
    assert RECHECK_MIN_S <= waiting.retry_in_s <= 5


async def test_a_follower_waits_for_nothing_the_limiter_would_charge(service: JobService) -> None:
    leader_id = await create(service, "no permit for a follower")
    follower_id = await create(service, "no permit for a follower")
    assert await service.store.waiting_request(leader_id) is not None
    assert await service.store.waiting_request(follower_id) is None


async def test_batch_items_follow_across_insert_chunks(service: JobService) -> None:
    def item(content: str) -> ItemSpec:
        return ItemSpec(
            kind=JobKind.PROMPT,
            model=None,
            input={"messages": [{"role": "user", "content": content}], "params": DETERMINISTIC},
            max_attempts=None,
            deadline_s=None,
            idempotency_key=None,
        )

    # The first and the last item are identical, and in different INSERT chunks
    items = [item("repeated far apart")]
    items += [item(f"filler {n}") for n in range(INSERT_CHUNK - 1)]
    items.append(item("repeated far apart"))
    created = await BatchService(service).create(items, owner_key_id=None, enqueue=False)
    assert created.created == INSERT_CHUNK + 1 and created.following == 1
    jobs = await service.store.list_jobs(batch_id=created.batch.id, limit=INSERT_CHUNK + 1)
    by_index = {job.batch_index: job for job in jobs}
    assert by_index[INSERT_CHUNK].cached_from == by_index[0].id
    assert sum(job.cached_from is not None for job in jobs) == 1


def test_a_follower_looks_again_sooner_when_young() -> None:
    ages = [0, 1, 10, 60, 3600]
    waits = [recheck_s(age) for age in ages]
    assert waits == sorted(waits)
    assert waits[0] == RECHECK_MIN_S and waits[-1] == RECHECK_MAX_S


async def refused_pair(service: JobService, content: str) -> tuple[str, str]:
    """A leader the model refused and its follower, which took the refusal: their ids."""
    store = service.store
    leader_id, follower_id = await create(service, content), await create(service, content)
    claim = await store.claim(leader_id, worker="w", lease_s=30)
    assert isinstance(claim, Claim)
    refusal = AttemptResult(
        outcome=AttemptOutcome.PERMANENT_ERROR, latency_ms=5, status_code=400, error="HTTP 400"
    )
    await store.finish_attempt(claim, refusal, job_status=JobStatus.FAILED)
    assert await store.claim(follower_id, worker="w", lease_s=30) is None
    follower = await store.get_job(follower_id)
    assert follower is not None and follower.status == JobStatus.FAILED
    return leader_id, follower_id


async def test_a_retried_follower_calls_unless_its_leader_is_retried_with_it(
    service: JobService,
) -> None:
    store = service.store
    # Given two followers that took their leader's refusal
    _, alone = await refused_pair(service, "retried alone")
    leader_id, together = await refused_pair(service, "retried together")

    # When one is retried alone, it makes its own call: an old refusal is not taken again
    assert await store.requeue([alone]) == [alone]
    assert await cached_from(service, alone) is None
    assert isinstance(await store.claim(alone, worker="w", lease_s=30), Claim)

    # And when the other is retried with its leader, it waits for the leader's new call
    assert sorted(await store.requeue([together, leader_id])) == sorted([together, leader_id])
    assert await cached_from(service, together) == leader_id
    waiting = await store.claim(together, worker="w", lease_s=30)
    assert isinstance(waiting, Following) and waiting.leader_id == leader_id
