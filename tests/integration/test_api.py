"""The HTTP API on a real port, over real Redis and a real database (SQLite and PostgreSQL).

Given the aiohttp app from `api.app.create_app` served in-process on an ephemeral port, when a
client talks HTTP to it, then jobs are accepted, stored, queued, run by an in-process worker
against the fake LLM, and read back; bad input is refused with a JSON error and leaves nothing
behind.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from promptq.service import JobService
from promptq.settings import Settings
from promptq.testing.fake_llm import FakeLLM, expected_reply
from tests.conftest import ApiStarter, KeyFactory, WorkerFactory, bearer, wait_terminal

Client = TestClient[web.Request, web.Application]
ApiFactory = Callable[..., Awaitable[Client]]


@pytest.fixture
async def make_api(start_api: ApiStarter, make_key: KeyFactory) -> ApiFactory:
    """Start the real API app; its client sends an admin API key (test_auth.py covers keys)."""
    key = await make_key("test-api-admin", admin=True)

    async def make(**overrides: Any) -> Client:
        return await start_api(bearer(key), **overrides)

    return make


@pytest.fixture
async def api(make_api: ApiFactory) -> Client:
    """An HTTP client for the API running with this test's settings."""
    return await make_api()


def prompt_body(content: str, **extra: Any) -> dict[str, Any]:
    """A prompt job request with one user message."""
    return {"kind": "prompt", "messages": [{"role": "user", "content": content}], **extra}


async def post_job(api: Client, body: Any) -> tuple[int, dict[str, Any], Any]:
    """POST a JSON body; return (status, headers, parsed JSON)."""
    async with api.post("/api/jobs", json=body) as response:
        return response.status, dict(response.headers), await response.json()


async def get_json(api: Client, path: str, **params: str) -> tuple[int, Any]:
    """GET a path; return (status, parsed JSON)."""
    async with api.get(path, params=params) as response:
        return response.status, await response.json()


async def count_jobs(service: JobService) -> int:
    """How many rows `jobs` holds."""
    return len(await service.store.list_jobs(limit=500))


async def queued_in_redis(service: JobService) -> int:
    """How many arq jobs wait in the queue's sorted set."""
    count: int = await service.queue.redis.zcard(service.queue.queue_name)
    return count


def assert_error(body: Any, code: str) -> None:
    """`body` is the one error shape, with `code` and a message but no traceback."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert "Traceback" not in json.dumps(body)


# -- 1. submit ----------------------------------------------------------------------------------


async def test_submit_prompt_and_summarize_are_stored_and_queued(
    api: Client, service: JobService, settings: Settings
) -> None:
    # Given a prompt job with defaults and a summarize job with explicit options
    bodies = [
        prompt_body("hello there"),
        {
            "kind": "summarize",
            "document": "Alpha beta gamma.",
            "instructions": "One line.",
            "model": "fake-large",
            "max_attempts": 3,
        },
    ]
    jobs = []
    for body in bodies:
        # When each is POSTed
        status, headers, job = await post_job(api, body)
        # Then it is accepted and described
        assert status == 202, job
        assert headers["Location"] == f"/api/jobs/{job['id']}"
        assert "Idempotent-Replayed" not in headers
        assert uuid.UUID(job["id"])
        assert job["status"] == "queued"
        assert job["attempts"] == 0
        assert job["usage"] == {"prompt_tokens": None, "completion_tokens": None}
        assert job["created_at"] and job["started_at"] is None and job["finished_at"] is None
        assert job["result"] is None and job["error"] is None
        jobs.append(job)

    prompt_job, summarize_job = jobs
    assert prompt_job["kind"] == "prompt"
    assert prompt_job["model"] == settings.default_model == "fake-small"
    assert prompt_job["max_attempts"] == settings.max_attempts == 5
    assert prompt_job["input"]["messages"][0]["content"] == "hello there"
    assert summarize_job["kind"] == "summarize"
    assert summarize_job["model"] == "fake-large"
    assert summarize_job["max_attempts"] == 3
    assert summarize_job["input"]["document"] == "Alpha beta gamma."

    # And each row exists in SQL and its arq job is in Redis
    ids = [j["id"] for j in jobs]
    for job in jobs:
        row = await service.store.get_job(job["id"])
        assert row is not None
        assert (row.kind, row.status, row.model) == (job["kind"], "queued", job["model"])
    assert await service.queue.missing(ids) == []
    assert await queued_in_redis(service) == 2

    # And GET returns the same job
    for job in jobs:
        status, fetched = await get_json(api, f"/api/jobs/{job['id']}")
        assert status == 200
        assert fetched == job


# -- 2. run -------------------------------------------------------------------------------------


async def test_jobs_run_to_success_and_show_their_attempts(
    api: Client, service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a job that succeeds at once, one that fails once with a 500, and a summarize job
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "name three colours"},
    ]
    flaky = "x [[fake: 500, ok]]"
    bodies = [
        {"kind": "prompt", "messages": messages},
        prompt_body(flaky),
        {"kind": "summarize", "document": "Alpha beta gamma. " * 20, "model": "fake-large"},
    ]
    ids = []
    for body in bodies:
        status, _, job = await post_job(api, body)
        assert status == 202
        ids.append(job["id"])

    # When a worker runs them
    await start_worker()
    await wait_terminal(service.store, ids)

    # Then the API shows each succeeded with its result, usage and timestamps
    jobs = []
    for job_id in ids:
        status, job = await get_json(api, f"/api/jobs/{job_id}")
        assert status == 200
        assert job["status"] == "succeeded", job
        assert job["error"] is None and job["error_code"] is None
        assert job["finish_reason"] == "stop"
        assert job["usage"]["prompt_tokens"] > 0 and job["usage"]["completion_tokens"] > 0
        assert job["started_at"] and job["finished_at"]
        assert job["created_at"] <= job["started_at"] <= job["finished_at"]
        jobs.append(job)
    plain, retried, summary = jobs
    assert plain["result"] == expected_reply("fake-small", messages)
    assert plain["attempts"] == 1
    assert retried["result"] == expected_reply("fake-small", bodies[1]["messages"])
    assert retried["attempts"] == 2 == fake_llm.stats.requests_by_prompt[flaky]
    assert summary["result"].startswith("[fake-large] reply ")
    assert "Alpha beta gamma." in summary["result"]

    # And the attempt history is in order, with what went wrong and who ran it
    status, body = await get_json(api, f"/api/jobs/{retried['id']}/attempts")
    assert status == 200
    assert body["job_id"] == retried["id"]
    first, second = body["attempts"]
    assert [(a["number"], a["outcome"], a["status_code"]) for a in (first, second)] == [
        (1, "transient_error", 500),
        (2, "succeeded", 200),
    ]
    assert "500" in first["error"] and second["error"] is None
    for attempt in (first, second):
        assert attempt["job_id"] == retried["id"]
        assert isinstance(attempt["latency_ms"], int) and attempt["latency_ms"] >= 0
        assert attempt["worker"]
        assert attempt["model"] == "fake-small"
        assert attempt["started_at"] <= attempt["finished_at"]
    assert first["finished_at"] <= second["started_at"]
    assert second["usage"]["completion_tokens"] == retried["usage"]["completion_tokens"]

    status, body = await get_json(api, f"/api/jobs/{plain['id']}/attempts")
    assert status == 200
    assert [(a["number"], a["outcome"]) for a in body["attempts"]] == [(1, "succeeded")]


# -- 3. idempotency -----------------------------------------------------------------------------


async def test_idempotency_key_returns_the_same_job(api: Client, service: JobService) -> None:
    # Given a job submitted with an idempotency key
    body = prompt_body("only once", idempotency_key="order-42")
    status, headers, first = await post_job(api, body)
    assert status == 202 and "Idempotent-Replayed" not in headers

    # When the same request is sent again
    status, headers, again = await post_job(api, body)

    # Then the same job comes back, marked as a replay, and there is still one row
    assert status == 202
    assert headers["Idempotent-Replayed"] == "true"
    assert headers["Location"] == f"/api/jobs/{first['id']}"
    assert again["id"] == first["id"]
    assert await count_jobs(service) == 1
    assert await queued_in_redis(service) == 1

    # When the key is reused for a different request
    for different in (
        prompt_body("something else", idempotency_key="order-42"),
        prompt_body("only once", idempotency_key="order-42", model="fake-large"),
        {"kind": "summarize", "document": "only once", "idempotency_key": "order-42"},
    ):
        status, headers, error = await post_job(api, different)
        # Then it is a conflict that names the key, and nothing new is stored
        assert status == 409, different
        assert_error(error, "idempotency_conflict")
        assert "order-42" in error["error"]["message"]
    assert await count_jobs(service) == 1


async def test_concurrent_submits_with_one_key_create_one_job(
    api: Client, service: JobService
) -> None:
    # Given ten identical requests with one idempotency key
    body = {"kind": "summarize", "document": "race me", "idempotency_key": "race-1"}

    # When they are all sent at once
    results = await asyncio.gather(*(post_job(api, body) for _ in range(10)))

    # Then all get the same job, exactly one created it, and one row exists
    assert {status for status, _, _ in results} == {202}
    assert len({job["id"] for _, _, job in results}) == 1
    replayed = [headers.get("Idempotent-Replayed") for _, headers, _ in results]
    assert sorted(replayed, key=str) == [None] + ["true"] * 9
    assert await count_jobs(service) == 1
    (job_id,) = {job["id"] for _, _, job in results}
    assert await service.queue.missing([job_id]) == []
    assert await queued_in_redis(service) == 1


# -- 4. bad input -------------------------------------------------------------------------------

MESSAGE = [{"role": "user", "content": "hi"}]

#: (case, raw body, expected status, expected error code): bodies that are not a JSON object.
NOT_AN_OBJECT: list[tuple[str, bytes, int, str]] = [
    ("invalid JSON", b'{"kind": "prompt",', 400, "invalid_json"),
    ("not UTF-8", b'{"kind": "\xff\xfe"}', 400, "invalid_json"),
    ("NaN", b'{"kind": "prompt", "messages": [], "max_attempts": NaN}', 400, "invalid_json"),
    ("empty body", b"", 422, "invalid_request"),
    ("blank body", b"  \n ", 422, "invalid_request"),
    ("JSON array", b"[1, 2]", 422, "invalid_request"),
    ("JSON string", b'"prompt"', 422, "invalid_request"),
    ("JSON number", b"42", 422, "invalid_request"),
    ("JSON null", b"null", 422, "invalid_request"),
]

#: (case, body): JSON objects that are not a valid job request; each is a 422.
INVALID_JOBS: list[tuple[str, dict[str, Any]]] = [
    ("unknown kind", {"kind": "translate", "messages": MESSAGE}),
    ("missing kind", {"messages": MESSAGE}),
    ("kind not a string", {"kind": 1, "messages": MESSAGE}),
    ("missing messages", {"kind": "prompt"}),
    ("empty messages", {"kind": "prompt", "messages": []}),
    ("bad role", {"kind": "prompt", "messages": [{"role": "wizard", "content": "hi"}]}),
    ("message without role", {"kind": "prompt", "messages": [{"content": "hi"}]}),
    ("message not an object", {"kind": "prompt", "messages": ["hi"]}),
    ("messages a string", {"kind": "prompt", "messages": "hi"}),
    ("max_attempts a string", prompt_body("hi", max_attempts="five")),
    ("max_attempts zero", prompt_body("hi", max_attempts=0)),
    ("max_attempts too many", prompt_body("hi", max_attempts=101)),
    ("temperature too high", prompt_body("hi", params={"temperature": 5})),
    ("unknown param", prompt_body("hi", params={"tempo": 1})),
    ("five stop sequences", prompt_body("hi", params={"stop": list("abcde")})),
    ("unknown extra field", prompt_body("hi", priority="high")),
    ("empty model", prompt_body("hi", model="")),
    ("empty idempotency key", prompt_body("hi", idempotency_key="")),
    ("summarize empty document", {"kind": "summarize", "document": ""}),
    ("summarize no document", {"kind": "summarize"}),
    ("summarize with messages", {"kind": "summarize", "document": "d", "messages": MESSAGE}),
]


async def test_bad_requests_are_refused_and_create_nothing(
    api: Client, service: JobService
) -> None:
    cases = NOT_AN_OBJECT + [
        (case, json.dumps(body).encode(), 422, "invalid_request") for case, body in INVALID_JOBS
    ]
    for case, raw, expected_status, expected_code in cases:
        # When a malformed or invalid body is POSTed
        async with api.post(
            "/api/jobs", data=raw, headers={"Content-Type": "application/json"}
        ) as response:
            text = await response.text()
            # Then it is a 4xx with the JSON error shape and no traceback
            assert response.status == expected_status, (case, text)
            assert response.content_type == "application/json", case
        assert_error(json.loads(text), expected_code)
        assert "Traceback" not in text and 'File "' not in text, case

    # And nothing was stored or queued
    assert await count_jobs(service) == 0
    assert await queued_in_redis(service) == 0


def nested(depth: int) -> Any:
    """A JSON value made of `depth` nested lists."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


async def test_bodies_that_could_not_be_stored_or_read_back_are_refused(
    api: Client, service: JobService
) -> None:
    # Given valid-looking requests that PostgreSQL cannot store (NUL characters) or that nest
    # deeper than a response can be written (orjson stops at 254 levels)
    cases = {
        "NUL in document": {"kind": "summarize", "document": "a\x00b"},
        "NUL in model": {"kind": "summarize", "document": "d", "model": "m\x00"},
        "NUL in key": {"kind": "summarize", "document": "d", "idempotency_key": "k\x00"},
        "NUL in stop": {"kind": "summarize", "document": "d", "params": {"stop": ["\x00"]}},
        "NUL in content": prompt_body("\x00"),
        "NUL in a field name": {
            "kind": "prompt",
            "messages": [{"role": "user", "content": "hi", "n\x00": 1}],
        },
        "300 levels deep": {
            "kind": "prompt",
            "messages": [{"role": "user", "content": "hi", "extra": nested(300)}],
        },
    }
    for case, body in cases.items():
        # When each is POSTed, then it is refused with a 422 that says why
        status, _, error = await post_job(api, body)
        assert status == 422, (case, error)
        assert_error(error, "invalid_request")
        assert "NUL" in error["error"]["message"] or "deeper" in error["error"]["message"]

    # And nothing was stored, so the listing still works
    assert await count_jobs(service) == 0
    assert await queued_in_redis(service) == 0
    status, page = await get_json(api, "/api/jobs")
    assert status == 200 and page["jobs"] == []

    # But an escaped backslash-u0000 (six printable characters) and moderate nesting are fine
    body = {
        "kind": "prompt",
        "messages": [{"role": "user", "content": "\\u0000", "extra": nested(40)}],
    }
    status, _, job = await post_job(api, body)
    assert status == 202, job
    assert job["input"]["messages"][0]["content"] == "\\u0000"
    status, page = await get_json(api, "/api/jobs")
    assert status == 200 and [j["id"] for j in page["jobs"]] == [job["id"]]


async def test_validation_messages_name_the_field(api: Client) -> None:
    # Given requests with one wrong field each, when POSTed, then the message says which
    cases = {
        "max_attempts": prompt_body("hi", max_attempts="five"),
        "temperature": prompt_body("hi", params={"temperature": 5}),
        "role": {"kind": "prompt", "messages": [{"role": "wizard", "content": "hi"}]},
        "document": {"kind": "summarize", "document": ""},
        "priority": prompt_body("hi", priority=1),
    }
    for field, body in cases.items():
        status, _, error = await post_job(api, body)
        assert status == 422
        assert field in error["error"]["message"], (field, error)


async def test_body_over_the_size_limit_is_413_and_creates_nothing(
    make_api: ApiFactory, service: JobService
) -> None:
    # Given an API that accepts at most 2048 bytes
    api = await make_api(api_max_body_bytes=2048)

    # When a (valid) job of 3000 bytes is POSTed
    status, _, error = await post_job(api, {"kind": "summarize", "document": "x" * 3000})

    # Then it is refused as too large and nothing is stored or queued
    assert status == 413
    assert_error(error, "request_entity_too_large")
    assert "2048" in error["error"]["message"]
    assert await count_jobs(service) == 0
    assert await queued_in_redis(service) == 0

    # And a body just under the limit is still accepted
    status, _, job = await post_job(api, {"kind": "summarize", "document": "x" * 1800})
    assert status == 202, job
    assert await count_jobs(service) == 1


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["\x00", "a\x00b", "\\u0000"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=15,
)

#: Objects shaped like a job request, with any JSON where the values go.
job_like = st.fixed_dictionaries(
    {"kind": st.sampled_from(["prompt", "summarize", "other"]) | json_values},
    optional={
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system", "bogus"]) | json_values},
                optional={"content": st.text(max_size=30) | json_values},
            ),
            max_size=3,
        )
        | json_values,
        "document": st.text(max_size=30) | json_values,
        "instructions": st.text(max_size=30) | json_values,
        "model": st.text(max_size=30) | json_values,
        "params": st.dictionaries(
            st.sampled_from(["temperature", "max_tokens", "top_p", "stop", "seed", "x"]),
            json_values,
            max_size=3,
        )
        | json_values,
        "max_attempts": st.integers() | json_values,
        "idempotency_key": st.text(max_size=20) | json_values,
    },
)


#: Any character, with those that databases and JSON stumble over made common.
any_char = st.sampled_from("\x00\\\"'\n") | st.characters(codec="utf-8")


def any_text(min_size: int = 0, max_size: int = 40) -> st.SearchStrategy[str]:
    """Text of any characters."""
    return st.text(alphabet=any_char, min_size=min_size, max_size=max_size)


#: Requests that are valid but for their text, which may be anything (NUL, emoji, 255 chars).
plausible_jobs = st.fixed_dictionaries(
    {"kind": st.just("summarize"), "document": any_text(min_size=1)},
    optional={
        "instructions": any_text(),
        "model": any_text(min_size=1),
        "idempotency_key": any_text(min_size=1),
        "params": st.fixed_dictionaries({}, optional={"stop": any_text()}),
    },
) | st.fixed_dictionaries(
    {
        "kind": st.just("prompt"),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user", "assistant"]), "content": any_text()}
            ),
            min_size=1,
            max_size=3,
        ),
    }
)


@given(body=json_values | job_like | plausible_jobs)
@hypothesis_settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
async def test_arbitrary_json_bodies_never_cause_a_server_error(api: Client, body: Any) -> None:
    # Given any JSON value as the body, when it is POSTed
    async with api.post("/api/jobs", data=json.dumps(body)) as response:
        text = await response.text()
        # Then the answer is a 202 or a 4xx, never a 5xx, and always JSON
        assert response.status < 500, (body, text)
        assert response.content_type == "application/json"
    answer = json.loads(text)
    if response.status == 202:
        assert answer["status"] == "queued"  # no worker runs here
    else:
        assert 400 <= response.status < 500
        assert set(answer) == {"error"} and set(answer["error"]) == {"code", "message"}
        assert answer["error"]["code"] and answer["error"]["message"]


@given(document=any_text(min_size=1), key=any_text(min_size=1), model=any_text(min_size=1))
@hypothesis_settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
async def test_any_text_is_stored_exactly_or_refused(
    api: Client, document: str, key: str, model: str
) -> None:
    # Given a valid request whose text fields hold any characters, when it is POSTed
    key = f"{uuid.uuid4()}{key}"[:255]  # examples share one database: keep keys apart
    body = {"kind": "summarize", "document": document, "model": model, "idempotency_key": key}
    status, _, job = await post_job(api, body)

    # Then it is either refused with a 422 that says why (a NUL, or no text to summarize), or
    # stored and read back unchanged
    if status == 422:
        assert_error(job, "invalid_request")
        assert "\x00" in document + key + model or document.isspace(), job
        return
    assert status == 202, job
    status, fetched = await get_json(api, f"/api/jobs/{job['id']}")
    assert status == 200
    assert fetched["input"]["document"] == document
    assert (fetched["model"], fetched["idempotency_key"]) == (model, key)


# -- 5. reading jobs ----------------------------------------------------------------------------


async def test_unknown_jobs_are_404(api: Client) -> None:
    # Given ids that name no job, when they are read, then each is a JSON 404
    for path in (
        f"/api/jobs/{uuid.uuid4()}",
        "/api/jobs/not-a-uuid",
        "/api/jobs/' OR 1=1 --",
        f"/api/jobs/{uuid.uuid4()}/attempts",
        "/api/jobs/not-a-uuid/attempts",
    ):
        status, error = await get_json(api, path)
        assert status == 404, path
        assert_error(error, "not_found")


async def test_job_id_is_read_in_any_case(api: Client) -> None:
    # Given a job, when it is read with its id in upper case, then it is found
    _, _, job = await post_job(api, prompt_body("case"))
    status, fetched = await get_json(api, f"/api/jobs/{job['id'].upper()}")
    assert status == 200
    assert fetched["id"] == job["id"]


# -- 6. listing ---------------------------------------------------------------------------------


async def test_list_filters_by_status_and_kind(
    api: Client, service: JobService, start_worker: WorkerFactory
) -> None:
    # Given two jobs that succeed (one prompt, one summarize) and one that fails permanently
    ok = (await post_job(api, prompt_body("fine")))[2]["id"]
    doc = (await post_job(api, {"kind": "summarize", "document": "short"}))[2]["id"]
    bad = (await post_job(api, prompt_body("broken [[fake: 400]]")))[2]["id"]
    await start_worker()
    await wait_terminal(service.store, [ok, doc, bad])

    async def listed(**params: str) -> list[str]:
        status, page = await get_json(api, "/api/jobs", **params)
        assert status == 200, page
        assert page["next_cursor"] is None
        return [job["id"] for job in page["jobs"]]

    # When the list is filtered, then only matching jobs come back, newest first
    assert await listed() == [bad, doc, ok]
    assert await listed(status="succeeded") == [doc, ok]
    assert await listed(status="failed") == [bad]
    assert await listed(status="queued") == []
    assert await listed(kind="summarize") == [doc]
    assert await listed(kind="prompt") == [bad, ok]
    assert await listed(kind="prompt", status="succeeded") == [ok]
    assert await listed(status="", kind="") == [bad, doc, ok]


async def test_list_rejects_bad_parameters(api: Client) -> None:
    # Given invalid listing parameters, when GET /api/jobs is called, then each is a clear 422
    cases = [
        ({"status": "done"}, "status"),
        ({"status": "SUCCEEDED"}, "status"),
        ({"kind": "translate"}, "kind"),
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "abc"}, "limit"),
        ({"limit": "2.5"}, "limit"),
        ({"cursor": "garbage"}, "cursor"),
        ({"include_input": "yes"}, "include_input"),
        # a misspelt filter would otherwise list every job as if it were the filtered few
        ({"batch": "0193a3b4-0000-7000-8000-000000000000"}, "'batch'"),
        ({"batch_id": "0193a3b4-0000-7000-8000-000000000000", "statuss": "failed"}, "'statuss'"),
    ]
    for params, name in cases:
        status, error = await get_json(api, "/api/jobs", **params)
        assert status == 422, (params, error)
        assert_error(error, "invalid_request")
        assert name in error["error"]["message"], (params, error)
    # The refusal of an unknown parameter names the ones the route takes; batches alike
    status, error = await get_json(api, "/api/batches", limt="5")
    assert status == 422 and "'limt'" in error["error"]["message"], error
    assert "limit, cursor" in error["error"]["message"], error

    # And the limits themselves are accepted
    for limit in ("1", "500"):
        status, page = await get_json(api, "/api/jobs", limit=limit)
        assert status == 200 and page == {"jobs": [], "next_cursor": None}


async def test_list_pagination_returns_every_job_once_newest_first(api: Client) -> None:
    # Given ten jobs
    submitted = []
    for i in range(10):
        status, _, job = await post_job(api, prompt_body(f"page me {i}"))
        assert status == 202
        submitted.append(job["id"])

    # When the list is read three at a time, following next_cursor
    pages: list[list[str]] = []
    params: dict[str, str] = {"limit": "3"}
    while True:
        status, page = await get_json(api, "/api/jobs", **params)
        assert status == 200
        pages.append([job["id"] for job in page["jobs"]])
        if page["next_cursor"] is None:
            break
        assert page["next_cursor"] == pages[-1][-1]
        params["cursor"] = page["next_cursor"]
        assert len(pages) <= 10, "pagination does not end"

    # Then every job comes back exactly once, newest (highest time-ordered id) first
    assert [len(p) for p in pages] == [3, 3, 3, 1]
    listed = [job_id for page in pages for job_id in page]
    assert sorted(listed) == sorted(submitted)
    assert listed == sorted(submitted, reverse=True)


# -- 7, 8. health and routing -------------------------------------------------------------------


async def test_healthz_reports_both_services(api: Client) -> None:
    status, body = await get_json(api, "/healthz")
    assert status == 200
    assert body == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}


async def test_unknown_route_and_wrong_method_are_json_errors(api: Client) -> None:
    # Given a path that is not routed, when it is requested, then a JSON 404 (not HTML)
    for path in ("/nope", "/api/jobs/x/y/z", "/api"):
        async with api.get(path) as response:
            assert response.status == 404, path
            assert response.content_type == "application/json"
            assert_error(await response.json(), "not_found")

    # Given a routed path, when it is used with the wrong method, then a JSON 405 with Allow
    for method, path in (("DELETE", "/api/jobs"), ("PUT", f"/api/jobs/{uuid.uuid4()}")):
        async with api.request(method, path) as response:
            assert response.status == 405, (method, path)
            assert response.content_type == "application/json"
            assert "GET" in response.headers["Allow"]
            assert_error(await response.json(), "method_not_allowed")
