"""What makes two requests the same, for the result cache, single flight and idempotency keys.

Given the real API, store, queue and worker on SQLite and PostgreSQL, and the fake LLM:
* an answer a fallback model gave is never reused for a request without that fallback (the
  fallback models are part of the request hash), at submit (cache) or in flight (single flight);
* an idempotency key sent again with another `deadline_s` or `cache` choice is a 409, for
  `POST /api/jobs` and for batch items, while the same request is replayed;
* a follower that took its leader's answer has nothing due any more (`next_attempt_at`).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from promptq.batch_items import ItemSpec
from promptq.batches import BatchService
from promptq.models import AttemptOutcome, JobKind, JobStatus
from promptq.schemas import PromptJobCreate, SummarizeJobCreate, job_create_adapter
from promptq.service import JobService
from promptq.single_flight import Following
from promptq.store import AttemptResult, Claim
from promptq.testing.fake_llm import FakeLLM, expected_reply
from tests.conftest import ApiClient, ApiStarter, KeyFactory, WorkerFactory, bearer
from tests.integration.test_cache import answered, prompt

DETERMINISTIC = {"temperature": 0}


@pytest.fixture
async def key(make_key: KeyFactory) -> str:
    return await make_key("identity-user")


@pytest.fixture
async def api(start_api: ApiStarter, key: str) -> ApiClient:
    return await start_api(bearer(key))


def service_request(body: dict[str, Any]) -> PromptJobCreate | SummarizeJobCreate:
    return job_create_adapter.validate_python(body)


# -- fallback models -----------------------------------------------------------------------


async def test_a_fallback_models_answer_is_not_reused_for_the_model_alone(
    api: ApiClient, key: str, service: JobService, fake_llm: FakeLLM, start_worker: WorkerFactory
) -> None:
    await start_worker()
    # Given a deterministic chat completion on fake-small that fake-large answered (fake-small
    # is unavailable the first time this content is asked for)
    content = "[[fake: 404, ok]] who answers?"
    messages = [{"role": "user", "content": content}]
    chat = {
        "model": "fake-small",
        "messages": messages,
        "fallback_models": ["fake-large"],
        "temperature": 0,
    }
    async with (
        aiohttp.ClientSession(headers=bearer(key)) as http,
        http.post(api.make_url("/v1/chat/completions"), json=chat) as response,
    ):
        assert response.status == 200, await response.text()
        body = await response.json()
    assert body["choices"][0]["message"]["content"] == expected_reply("fake-large", messages)
    calls = fake_llm.stats.total_requests

    # When the same messages are asked of fake-small alone
    job = await answered(api, service, prompt(content, model="fake-small", params=DETERMINISTIC))

    # Then fake-small answers them itself, and fake-large's answer is not passed off as its
    assert job["cached_from"] is None and job["attempts"] == 1
    assert job["result"] == expected_reply("fake-small", messages)
    assert fake_llm.stats.total_requests == calls + 1

    # While the same request with the same fallback is still answered from the cache
    async with (
        aiohttp.ClientSession(headers=bearer(key)) as http,
        http.post(api.make_url("/v1/chat/completions"), json=chat) as response,
    ):
        assert response.status == 200, await response.text()
        again = await response.json()
    assert again["choices"][0]["message"]["content"] == expected_reply("fake-large", messages)
    assert fake_llm.stats.total_requests == calls + 1
    # naming the model that made the answer, as the first response did
    assert again["model"] == body["model"] == "fake-large"


async def test_a_request_does_not_follow_one_with_other_fallback_models(
    service: JobService,
) -> None:
    content = "follow the same chain only"

    def item(fallbacks: list[str]) -> ItemSpec:
        job_input: dict[str, Any] = {
            "messages": [{"role": "user", "content": content}],
            "params": DETERMINISTIC,
        }
        if fallbacks:
            job_input["fallback_models"] = fallbacks
        return ItemSpec(
            kind=JobKind.PROMPT,
            model="fake-small",
            input=job_input,
            max_attempts=None,
            deadline_s=None,
            idempotency_key=None,
        )

    # Given a queued job on fake-small with fallback fake-large (an OpenAI Batch API line)
    batch = BatchService(service)
    first = await batch.create([item(["fake-large"])], owner_key_id=None, enqueue=False)
    assert first.following == 0

    # When items ask fake-small alone, or with the same fallback
    second = await batch.create(
        [item([]), item(["fake-large"]), item(["fake-large", "fake-small"])],
        owner_key_id=None,
        enqueue=False,
    )

    # Then only the one with the same fallback waits for it
    assert second.following == 1
    jobs = await service.store.list_jobs(batch_id=second.batch.id)
    by_index = {job.batch_index: job for job in jobs}
    (leader,) = await service.store.list_jobs(batch_id=first.batch.id)
    assert by_index[0].cached_from is None
    assert by_index[1].cached_from == leader.id
    assert by_index[2].cached_from is None
    hit, _ = await service.submit(
        service_request(prompt(content, model="fake-small", params=DETERMINISTIC))
    )
    assert hit.cached_from is None


# -- idempotency keys ----------------------------------------------------------------------


async def post_job(api: ApiClient, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with api.post("/api/jobs", json=body) as response:
        found: dict[str, Any] = await response.json()
        return response.status, found


async def test_a_key_sent_again_with_another_deadline_or_cache_choice_is_a_conflict(
    api: ApiClient,
) -> None:
    body = prompt("keyed", params=DETERMINISTIC, idempotency_key="k1", deadline_s=3600)
    status, first = await post_job(api, body)
    assert status == 202, first

    # The same request is replayed
    status, replayed = await post_job(api, body)
    assert status == 202 and replayed["id"] == first["id"]

    # Another deadline, or another cache choice, is another request
    for other in (
        body | {"deadline_s": 5},
        {k: v for k, v in body.items() if k != "deadline_s"},
        body | {"cache": False},
        body | {"cache": True},
    ):
        status, refused = await post_job(api, other)
        assert status == 409, (other, refused)
        assert refused["error"]["code"] == "idempotency_conflict"

    # And a key first used with a cache choice replays only with that choice
    chosen = prompt("keyed", params=DETERMINISTIC, idempotency_key="k2", cache=False)
    status, second = await post_job(api, chosen)
    assert status == 202, second
    status, again = await post_job(api, chosen)
    assert status == 202 and again["id"] == second["id"]
    status, _ = await post_job(api, {k: v for k, v in chosen.items() if k != "cache"})
    assert status == 409


async def test_a_batch_item_key_sent_again_with_another_deadline_or_cache_is_a_conflict(
    api: ApiClient,
) -> None:
    item = prompt("keyed item", params=DETERMINISTIC, idempotency_key="item-1", deadline_s=60)
    async with api.post("/api/batches", json={"jobs": [item]}) as response:
        assert response.status == 201, await response.text()
    async with api.post("/api/batches", json={"jobs": [item]}) as response:
        assert response.status == 200, await response.text()  # sent again: replayed
    for other in (item | {"deadline_s": 61}, item | {"cache": False}):
        async with api.post("/api/batches", json={"jobs": [other]}) as response:
            assert response.status == 409, (other, await response.text())


# -- a follower's end ----------------------------------------------------------------------


async def test_a_follower_that_took_its_answer_has_nothing_due(service: JobService) -> None:
    store = service.store
    body = prompt("nothing due after", params=DETERMINISTIC)
    leader, _ = await service.submit(service_request(body))
    follower, _ = await service.submit(service_request(body))
    assert follower.cached_from == leader.id

    # Given a follower that looked at its running leader (and so has a next look set)
    claim = await store.claim(leader.id, worker="w", lease_s=30)
    assert isinstance(claim, Claim)
    assert isinstance(await store.claim(follower.id, worker="w", lease_s=30), Following)
    waiting = await store.get_job(follower.id)
    assert waiting is not None and waiting.next_attempt_at is not None

    # When the leader succeeds and the follower takes its answer
    await store.finish_attempt(
        claim,
        AttemptResult(outcome=AttemptOutcome.SUCCEEDED, latency_ms=1, result="shared"),
        job_status=JobStatus.SUCCEEDED,
    )
    assert await store.claim(follower.id, worker="w", lease_s=30) is None

    # Then it is succeeded with nothing left to come
    done = await store.get_job(follower.id)
    assert done is not None and done.status == JobStatus.SUCCEEDED and done.result == "shared"
    assert done.next_attempt_at is None and done.lease_expires_at is None
