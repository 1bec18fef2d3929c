"""API keys and tenant isolation on the real app, over real Redis and SQLite / PostgreSQL.

Given the API served in-process with auth on, when a client calls every route with no key, a
malformed header, a wrong key or a revoked key, then it gets 401 and nothing happens; with a
valid key it sees only its own jobs (another tenant's are 404, as if they did not exist), and an
admin key sees everything.

ROUTES lists every `/api` and `/v1` route. Adding a route to the app without adding it here fails
`test_the_route_table_covers_every_registered_route`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

from api.auth import Authenticator
from promptq.client import PromptQClient
from promptq.db import create_engine, create_sessionmaker
from promptq.errors import Unauthorized
from promptq.keys import KeyStore
from promptq.service import JobService, parse_job_request
from promptq.settings import Settings
from tests.conftest import ApiStarter, KeyFactory, bearer

Client = TestClient[web.Request, web.Application]
ApiFactory = Callable[..., Awaitable[Client]]


@dataclass(frozen=True)
class Route:
    """One API route: how to call it, and whether it is about one job."""

    method: str
    path: str
    body: dict[str, Any] | None = None
    #: What the job's owner gets for a freshly queued job (retry refuses it, but finds it).
    owner_status: int = 200
    #: Answers with server-sent events (`call` returns the first event's data).
    streams: bool = False
    #: The `{id}` is a job's and a second call by the owner answers as the first (not true of
    #: batch routes, which tests/integration/test_batches.py checks, nor of cancel, which
    #: tests/integration/test_cancel.py checks).
    job_checks: bool = True

    @property
    def per_job(self) -> bool:
        """True for routes that name a job id and get the isolation checks below."""
        return "{id}" in self.path and self.job_checks

    def url(self, job_id: str) -> str:
        """The path with the job id filled in."""
        return self.path.format(id=job_id)


def prompt_body(content: str, **extra: Any) -> dict[str, Any]:
    """A prompt job request with one user message."""
    return {"kind": "prompt", "messages": [{"role": "user", "content": content}], **extra}


#: Every route under /api. Add new routes here (per-job ones get the isolation checks too).
ROUTES = [
    Route("POST", "/api/jobs", prompt_body("from the route table")),
    Route("GET", "/api/jobs"),
    Route("GET", "/api/jobs/{id}"),
    Route("GET", "/api/jobs/{id}/attempts"),
    Route("POST", "/api/jobs/{id}/retry", owner_status=409),
    Route("POST", "/api/jobs/summarize/upload"),
    Route("GET", "/api/jobs/{id}/stream", streams=True),
    Route("POST", "/api/jobs/{id}/cancel", job_checks=False),
    Route("POST", "/api/batches", {"jobs": [prompt_body("from the route table")]}),
    Route("GET", "/api/batches"),
    Route("GET", "/api/batches/{id}", job_checks=False),
    Route("GET", "/api/batches/{id}/results", job_checks=False),
    Route("GET", "/api/batches/{id}/compare", job_checks=False),
    Route("POST", "/api/batches/{id}/cancel", job_checks=False),
    # The OpenAI-compatible API (tenant isolation of its files and batches: test_openai_batches)
    Route("POST", "/v1/chat/completions", {"model": "fake-small", "messages": []}),
    Route("GET", "/v1/models"),
    Route("GET", "/v1/models/{id}", job_checks=False),
    Route("POST", "/v1/files"),
    Route("GET", "/v1/files"),
    Route("GET", "/v1/files/{id}", job_checks=False),
    Route("GET", "/v1/files/{id}/content", job_checks=False),
    Route("DELETE", "/v1/files/{id}", job_checks=False),
    Route("POST", "/v1/batches", {"input_file_id": "file-x"}),
    Route("GET", "/v1/batches"),
    Route("GET", "/v1/batches/{id}", job_checks=False),
    Route("POST", "/v1/batches/{id}/cancel", job_checks=False),
]
PER_JOB_ROUTES = [r for r in ROUTES if r.per_job]
#: Prefixes that must never be reachable without a key.
PROTECTED_PREFIXES = ("/api", "/v1")


def route_id(route: Route) -> str:
    """A readable pytest id."""
    return f"{route.method} {route.path}"


@pytest.fixture
def make_api(start_api: ApiStarter) -> ApiFactory:
    """Start the real API app on an ephemeral port; its client sends no key by default."""
    return start_api


@pytest.fixture
async def api(make_api: ApiFactory) -> Client:
    """The API with auth on and the key cache off, so revocations show at once."""
    return await make_api(api_key_cache_s=0)


@pytest.fixture
async def keys(settings: Settings) -> AsyncIterator[KeyStore]:
    """The key store on this test's database."""
    engine = create_engine(settings)
    yield KeyStore(create_sessionmaker(engine))
    await engine.dispose()


async def call(
    api: Client, route: Route, job_id: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """Call a route; return (status, headers, parsed JSON body or first event's data)."""
    async with api.request(
        route.method, route.url(job_id), json=route.body, headers=headers or {}
    ) as response:
        if response.content_type == "text/event-stream":
            return response.status, dict(response.headers), await first_event(response)
        return response.status, dict(response.headers), await response.json()


async def first_event(response: ClientResponse) -> Any:
    """The data of the first server-sent event (the stream itself goes on until the job ends)."""
    async with asyncio.timeout(10):
        async for line in response.content:
            if line.startswith(b"data:"):
                return json.loads(line[len(b"data:") :])
    raise AssertionError("the stream ended without an event")


async def create_job(api: Client, key: str | None, content: str, **extra: Any) -> dict[str, Any]:
    """POST a prompt job as `key` (None: no header) and return it."""
    headers = bearer(key) if key else {}
    async with api.post("/api/jobs", json=prompt_body(content, **extra), headers=headers) as r:
        assert r.status == 202, await r.text()
        job: dict[str, Any] = await r.json()
        return job


async def list_ids(api: Client, key: str, **params: str) -> list[str]:
    """Every job id `key` can list, following cursors."""
    ids: list[str] = []
    cursor = ""
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        async with api.get("/api/jobs", params=query, headers=bearer(key)) as response:
            assert response.status == 200, await response.text()
            page = await response.json()
        ids += [job["id"] for job in page["jobs"]]
        if page["next_cursor"] is None:
            return ids
        cursor = page["next_cursor"]


def assert_unauthorized(status: int, headers: dict[str, str], body: Any, secret: str) -> None:
    """A 401 in the one error shape, with a Bearer challenge, that does not echo the key."""
    assert status == 401, body
    assert headers["WWW-Authenticate"].startswith("Bearer"), headers
    assert set(body) == {"error"} and body["error"]["code"] == "unauthorized", body
    assert body["error"]["message"]
    if secret:
        assert secret not in str(body) and secret not in str(headers)


# -- 1. no valid key, no access ---------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES, ids=route_id)
async def test_every_route_refuses_missing_malformed_wrong_and_revoked_keys(
    route: Route,
    api: Client,
    make_key: KeyFactory,
    keys: KeyStore,
    service: JobService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # Given a job owned by a valid key, and a key that has been revoked
    owner = await make_key("owner")
    job = await create_job(api, owner, "existing job")
    revoked = await make_key("revoked")
    await keys.revoke("revoked")
    wrong = "pq_" + "x" * 43

    cases: dict[str, dict[str, str]] = {
        "no header": {},
        "empty header": {"Authorization": ""},
        "bare scheme": {"Authorization": "Bearer"},
        "no scheme": {"Authorization": owner},
        "basic scheme": {"Authorization": f"Basic {owner}"},
        "extra token": {"Authorization": f"Bearer {owner} extra"},
        "not a key": {"Authorization": "Bearer hunter2"},
        "wrong key": bearer(wrong),
        "revoked key": bearer(revoked),
        "truncated key": bearer(owner[:-1]),
    }
    for case, headers in cases.items():
        # When the route is called with it, then 401 and nothing is created
        status, response_headers, body = await call(api, route, job["id"], headers)
        assert_unauthorized(status, response_headers, body, secret=owner), case
    assert [j.id for j in await service.store.list_jobs()] == [job["id"]]
    # And no key, not even a rejected one, was logged
    for secret in (owner, revoked, wrong):
        assert secret not in caplog.text


async def test_healthz_needs_no_key(api: Client) -> None:
    async with api.get("/healthz") as response:
        assert response.status == 200
        assert (await response.json())["status"] == "ok"


async def test_unknown_paths_need_a_key_too(api: Client, make_key: KeyFactory) -> None:
    # Deny by default: without a key nobody learns which paths exist
    for path in ("/nope", "/api/nope", "/v1/chat/completions", "/healthz/extra"):
        async with api.get(path) as response:
            assert response.status == 401, path
    key = await make_key("prober")
    async with api.get("/api/nope", headers=bearer(key)) as response:
        assert response.status == 404


async def test_every_registered_route_refuses_a_request_without_a_key(api: Client) -> None:
    registered = registered_routes(api.app)
    assert registered, "no /api routes found: is the enumeration broken?"
    for method, path in registered:
        url = path.replace("{id}", str(uuid.uuid4()))
        async with api.request(method, url, json={}) as response:
            assert response.status == 401, (method, path)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_the_route_table_covers_every_registered_route(api: Client) -> None:
    # A route added to the app must be added to ROUTES, which the tests above and below use.
    registered = {(m, p) for m, p in registered_routes(api.app) if m != "HEAD"}
    assert registered == {(r.method, r.path) for r in ROUTES}


def registered_routes(app: web.Application | None) -> list[tuple[str, str]]:
    """(method, path template) of every app route under a protected prefix."""
    assert app is not None
    found = []
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith(PROTECTED_PREFIXES) and route.method != "*":
            found.append((route.method, path))
    return found


# -- 2. tenants see only their own jobs --------------------------------------------------------


@pytest.mark.parametrize("route", PER_JOB_ROUTES, ids=route_id)
async def test_another_tenants_job_is_404_on_every_per_job_route(
    route: Route, api: Client, make_key: KeyFactory
) -> None:
    # Given tenant A's job, tenant B and an admin
    tenant_a, tenant_b = await make_key("tenant-a"), await make_key("tenant-b")
    admin = await make_key("admin", admin=True)
    job = await create_job(api, tenant_a, "a's secret prompt")
    missing_id = str(uuid.uuid4())

    # When B asks for it, then 404, exactly as for a job that does not exist
    status, _, body = await call(api, route, job["id"], bearer(tenant_b))
    missing_status, _, missing_body = await call(api, route, missing_id, bearer(tenant_b))
    assert (status, missing_status) == (404, 404)
    assert body["error"]["code"] == missing_body["error"]["code"] == "not_found"
    assert body["error"]["message"].replace(job["id"], "ID") == missing_body["error"][
        "message"
    ].replace(missing_id, "ID")
    assert "secret prompt" not in str(body)

    # And A and the admin get it
    for key in (tenant_a, admin):
        status, _, body = await call(api, route, job["id"], bearer(key))
        assert status == route.owner_status, body
        if route.streams:
            assert body["status"] == "queued", body
        else:
            assert job["id"] in str(body)


async def test_uploaded_jobs_belong_to_the_uploading_key(
    api: Client, make_key: KeyFactory, service: JobService
) -> None:
    # Given two tenants and an admin
    tenant_a, tenant_b = await make_key("tenant-a"), await make_key("tenant-b")
    admin = await make_key("admin", admin=True)

    # When A uploads a document to summarize
    form = aiohttp.FormData()
    form.add_field("file", b"A's confidential notes.", filename="notes.txt")
    async with api.post(
        "/api/jobs/summarize/upload", data=form, headers=bearer(tenant_a)
    ) as response:
        assert response.status == 202, await response.text()
        (job,) = (await response.json())["jobs"]

    # Then the job is A's: it lists for A and the admin, never for B
    row = await service.store.get_job(job["id"])
    assert row is not None and row.owner_key_id is not None
    assert await list_ids(api, tenant_a) == [job["id"]]
    assert await list_ids(api, tenant_b) == []
    assert await list_ids(api, admin) == [job["id"]]
    async with api.get(f"/api/jobs/{job['id']}", headers=bearer(tenant_b)) as response:
        assert response.status == 404


async def test_listings_show_only_the_callers_jobs_and_admins_see_all(
    api: Client, make_key: KeyFactory, service: JobService
) -> None:
    # Given jobs from two tenants and one from the CLI (no owner)
    tenant_a, tenant_b = await make_key("tenant-a"), await make_key("tenant-b")
    admin = await make_key("admin", admin=True)
    a_jobs = [(await create_job(api, tenant_a, f"a {i}"))["id"] for i in range(3)]
    b_jobs = [(await create_job(api, tenant_b, f"b {i}"))["id"] for i in range(2)]

    cli_job, _ = await service.submit(parse_job_request(prompt_body("from the cli")))

    # When each lists jobs (one per page, so cursors are followed), then
    assert await list_ids(api, tenant_a, limit="1") == a_jobs[::-1]
    assert await list_ids(api, tenant_b, limit="1") == b_jobs[::-1]
    assert await list_ids(api, tenant_b, kind="prompt", status="queued") == b_jobs[::-1]
    assert set(await list_ids(api, admin)) == {*a_jobs, *b_jobs, cli_job.id}
    # And an admin's own submissions belong to the admin key, invisible to tenants
    admin_job = (await create_job(api, admin, "admin's"))["id"]
    assert admin_job not in await list_ids(api, tenant_a)


async def test_the_same_idempotency_key_from_two_tenants_makes_two_jobs(
    api: Client, make_key: KeyFactory
) -> None:
    tenant_a, tenant_b = await make_key("tenant-a"), await make_key("tenant-b")

    # Given both tenants use idempotency key "order-1" for the same request
    a_job = await create_job(api, tenant_a, "same", idempotency_key="order-1")
    b_job = await create_job(api, tenant_b, "same", idempotency_key="order-1")
    # Then they get two jobs
    assert a_job["id"] != b_job["id"]

    # And a repeat by A replays A's job, never B's
    body = prompt_body("same", idempotency_key="order-1")
    async with api.post("/api/jobs", json=body, headers=bearer(tenant_a)) as response:
        assert response.status == 202
        assert response.headers["Idempotent-Replayed"] == "true"
        assert (await response.json())["id"] == a_job["id"]

    # And B reusing the key for another request conflicts only with B's own job
    other = prompt_body("different", idempotency_key="order-1")
    async with api.post("/api/jobs", json=other, headers=bearer(tenant_b)) as response:
        assert response.status == 409
        message = (await response.json())["error"]["message"]
        assert b_job["id"] in message and a_job["id"] not in message


# -- 3. key lifetime, auth disabled, the Python client -----------------------------------------


async def test_a_revoked_key_is_trusted_until_its_cache_entry_expires(keys: KeyStore) -> None:
    # Given an authenticator caching for 30 s on a clock the test controls
    now = [1000.0]
    authenticator = Authenticator(keys, ttl_s=30, monotonic=lambda: now[0])
    _, key = await keys.create("cached")
    principal = await authenticator.authenticate(key)
    assert principal is not None and principal.name == "cached" and not principal.is_admin

    # When the key is revoked, then it still works within the window, and not after it
    await keys.revoke("cached")
    now[0] += 29
    assert await authenticator.authenticate(key) == principal
    now[0] += 2
    assert await authenticator.authenticate(key) is None
    assert await authenticator.authenticate(key) is None  # and it is not cached as valid


async def test_auth_disabled_lets_everyone_in_and_says_so_loudly(
    make_api: ApiFactory, make_key: KeyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Given an API with auth disabled, next to an owned job created while auth was on
    secured = await make_api()
    owned = await create_job(secured, await make_key("tenant"), "owned")

    caplog.set_level(logging.WARNING, logger="api.app")
    api = await make_api(auth_disabled=True)
    # Then it warned at startup
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("AUTH IS DISABLED" in r.getMessage() for r in warnings), caplog.text

    # And requests without a key work, and see every job
    job = await create_job(api, None, "no key needed")
    async with api.get("/api/jobs") as response:
        assert response.status == 200
        assert {j["id"] for j in (await response.json())["jobs"]} == {job["id"], owned["id"]}
    async with api.get(f"/api/jobs/{owned['id']}") as response:
        assert response.status == 200


def test_auth_is_on_unless_disabled_explicitly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMPTQ_AUTH_DISABLED", raising=False)
    assert Settings(_env_file=None).auth_disabled is False  # type: ignore[call-arg]
    monkeypatch.setenv("PROMPTQ_AUTH_DISABLED", "true")
    assert Settings(_env_file=None).auth_disabled is True  # type: ignore[call-arg]


async def test_python_client_sends_its_key(api: Client, make_key: KeyFactory) -> None:
    base_url = str(api.make_url("")).rstrip("/")
    key = await make_key("python")
    async with PromptQClient(base_url, api_key=key) as client:
        job = await client.submit_prompt("from python")
        assert (await client.get(job["id"]))["id"] == job["id"]
        assert [j["id"] for j in (await client.list())["jobs"]] == [job["id"]]
    async with PromptQClient(base_url) as anonymous:
        with pytest.raises(Unauthorized, match="Bearer"):
            await anonymous.get(job["id"])
    async with PromptQClient(base_url, api_key="pq_wrong") as wrong:
        with pytest.raises(Unauthorized, match="not valid or has been revoked"):
            await wrong.list()
