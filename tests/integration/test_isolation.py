"""Tenant isolation on every route that names an object, and in every listing.

Given tenant A's job and batch, tenant B and an admin, when B calls any route with A's object
id, then B gets 404 with the same body as for an id that does not exist (never 403, never the
data) and nothing changes; A and the admin get the object. Listings show B nothing of A's,
the admin everything. `test_every_route_with_an_id_is_in_the_table` fails when a route that
names an object is added to the app without being added here.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import ApiClient, ApiStarter, KeyFactory, bearer

#: Route prefixes whose routes must be isolated.
PREFIXES = ("/api/", "/v1/")


@dataclass(frozen=True)
class ObjectRoute:
    """A route naming one object by `{id}`: which kind, and what its owner gets."""

    kind: str
    method: str
    path: str
    #: Status the owner (or an admin) gets for a fresh object; several are fine for POSTs.
    owner_statuses: tuple[int, ...] = (200,)
    #: The owner's call removes the object: each owner call gets a fresh one.
    destructive: bool = False

    def url(self, object_id: str) -> str:
        """The path with the id filled in."""
        return self.path.replace("{id}", object_id)


OBJECT_ROUTES = [
    ObjectRoute("job", "GET", "/api/jobs/{id}"),
    ObjectRoute("job", "GET", "/api/jobs/{id}/attempts"),
    ObjectRoute("job", "GET", "/api/jobs/{id}/stream"),
    ObjectRoute("job", "POST", "/api/jobs/{id}/retry", (409,)),
    ObjectRoute("job", "POST", "/api/jobs/{id}/cancel", (200, 202, 409)),
    ObjectRoute("batch", "GET", "/api/batches/{id}"),
    ObjectRoute("batch", "GET", "/api/batches/{id}/results"),
    ObjectRoute("batch", "GET", "/api/batches/{id}/compare"),
    ObjectRoute("batch", "POST", "/api/batches/{id}/cancel", (200, 202, 409)),
    ObjectRoute("file", "GET", "/v1/files/{id}"),
    ObjectRoute("file", "GET", "/v1/files/{id}/content"),
    ObjectRoute("file", "DELETE", "/v1/files/{id}", destructive=True),
    ObjectRoute("v1batch", "GET", "/v1/batches/{id}"),
    ObjectRoute("v1batch", "POST", "/v1/batches/{id}/cancel", (200, 409)),
    # The dashboard's pages (a browser sends the key as a cookie; a header works as well)
    ObjectRoute("job", "GET", "/jobs/{id}"),
    ObjectRoute("batch", "GET", "/batches/{id}"),
]
#: Listing routes, and the key under which each lists its objects.
LISTINGS = {
    "/api/jobs": ("job", "jobs"),
    "/api/batches": ("batch", "batches"),
    "/v1/files": ("file", "data"),
    "/v1/batches": ("v1batch", "data"),
}
#: Routes with a path parameter that is not an owned object.
NOT_OWNED = {("GET", "/v1/models/{id}")}
#: Where each kind of object is read by its id.
READ_URLS = {
    "job": "/api/jobs/{id}",
    "batch": "/api/batches/{id}",
    "file": "/v1/files/{id}",
    "v1batch": "/v1/batches/{id}",
}


def prompt(content: str) -> dict[str, Any]:
    """A prompt job request."""
    return {"kind": "prompt", "messages": [{"role": "user", "content": content}]}


Creator = Callable[[ApiClient, str], Awaitable[str]]


async def create_job(api: ApiClient, key: str) -> str:
    """A queued job owned by `key`."""
    async with api.post("/api/jobs", json=prompt("a's secret job"), headers=bearer(key)) as r:
        assert r.status == 202, await r.text()
        return str((await r.json())["id"])


async def create_batch(api: ApiClient, key: str) -> str:
    """A batch of two queued jobs owned by `key`."""
    body = {"jobs": [prompt("a's secret item 1"), prompt("a's secret item 2")], "name": "a"}
    async with api.post("/api/batches", json=body, headers=bearer(key)) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["id"])


async def create_file(api: ApiClient, key: str) -> str:
    """An OpenAI batch input file owned by `key`."""
    line = {
        "custom_id": "a-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "fake-small", "messages": prompt("a's secret line")["messages"]},
    }
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", orjson.dumps(line) + b"\n", filename="secret.jsonl")
    async with api.post("/v1/files", data=form, headers=bearer(key)) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["id"])


async def create_v1_batch(api: ApiClient, key: str) -> str:
    """An OpenAI batch owned by `key`."""
    body = {
        "input_file_id": await create_file(api, key),
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    async with api.post("/v1/batches", json=body, headers=bearer(key)) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["id"])


CREATORS: dict[str, Creator] = {
    "job": create_job,
    "batch": create_batch,
    "file": create_file,
    "v1batch": create_v1_batch,
}


async def call(api: ApiClient, method: str, url: str, key: str) -> tuple[int, str]:
    """(status, the start of the body): enough to see data, without following a stream."""
    async with api.request(method, url, headers=bearer(key)) as response:
        chunk = await response.content.read(4096)
        return response.status, chunk.decode(errors="replace")


async def state(api: ApiClient, url: str, key: str) -> tuple[str, str | None]:
    """An object's status and when it was cancelled, as its owner reads it."""
    async with api.get(url, headers=bearer(key)) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
        return body.get("status"), body.get("cancelled_at")


@pytest.fixture
async def api(start_api: ApiStarter) -> ApiClient:
    """The API with auth on."""
    return await start_api(api_key_cache_s=0)


@pytest.mark.parametrize("route", OBJECT_ROUTES, ids=lambda r: f"{r.method} {r.path}")
async def test_another_tenants_object_is_404_and_untouched(
    route: ObjectRoute, api: ApiClient, make_key: KeyFactory
) -> None:
    # Given A's object, tenant B and an admin
    tenant_a, tenant_b = await make_key("tenant-a"), await make_key("tenant-b")
    admin = await make_key("admin", admin=True)
    object_id = await CREATORS[route.kind](api, tenant_a)
    missing_id = str(uuid.uuid4())
    kind_url = READ_URLS[route.kind].replace("{id}", object_id)
    before = await state(api, kind_url, tenant_a)

    # When B calls the route with A's id, then 404 exactly as for an id that does not exist
    status, body = await call(api, route.method, route.url(object_id), tenant_b)
    missing_status, missing_body = await call(api, route.method, route.url(missing_id), tenant_b)
    assert (status, missing_status) == (404, 404), body
    assert body.replace(object_id, "ID") == missing_body.replace(missing_id, "ID")
    assert "secret" not in body

    # And nothing changed for A (B's cancel or retry did nothing)
    assert await state(api, kind_url, tenant_a) == before

    # And A and the admin do get it
    for key in (admin, tenant_a):
        if route.destructive and key == tenant_a:
            object_id = await CREATORS[route.kind](api, tenant_a)
        status, body = await call(api, route.method, route.url(object_id), key)
        assert status in route.owner_statuses, (status, body)


@pytest.mark.parametrize("path", sorted(LISTINGS))
async def test_listings_show_a_tenant_only_its_own_and_an_admin_everything(
    path: str, api: ApiClient, make_key: KeyFactory
) -> None:
    kind, field = LISTINGS[path]
    tenant_a, tenant_b = await make_key("tenant-a"), await make_key("tenant-b")
    admin = await make_key("admin", admin=True)
    a_id = await CREATORS[kind](api, tenant_a)
    b_id = await CREATORS[kind](api, tenant_b)

    async def listed(key: str, query: str = "") -> set[str]:
        async with api.get(path + query, headers=bearer(key)) as response:
            assert response.status == 200, await response.text()
            return {item["id"] for item in (await response.json())[field]}

    assert await listed(tenant_a) == {a_id}
    assert await listed(tenant_b) == {b_id}
    assert {a_id, b_id} <= await listed(admin)


async def test_filtering_jobs_by_another_tenants_batch_shows_nothing(
    api: ApiClient, make_key: KeyFactory
) -> None:
    tenant_a, tenant_b = await make_key("tenant-a"), await make_key("tenant-b")
    batch_id = await create_batch(api, tenant_a)
    async with api.get(f"/api/jobs?batch_id={batch_id}", headers=bearer(tenant_b)) as response:
        assert response.status in (200, 404)
        body = await response.json()
        assert body.get("jobs", []) == []
    async with api.get(f"/api/jobs?batch_id={batch_id}", headers=bearer(tenant_a)) as response:
        assert len((await response.json())["jobs"]) == 2


async def test_every_route_with_an_id_is_in_the_table(api: ApiClient) -> None:
    assert api.app is not None
    with_ids = {
        (route.method, route.resource.canonical)
        for route in api.app.router.routes()
        if route.resource is not None
        and route.method not in ("HEAD", "*")
        and route.resource.canonical.startswith(PREFIXES)
        and "{" in route.resource.canonical
    }
    covered = {(r.method, r.path) for r in OBJECT_ROUTES} | NOT_OWNED
    assert with_ids - covered == set(), "add these routes to OBJECT_ROUTES (or NOT_OWNED)"
    listings = {
        route.resource.canonical
        for route in api.app.router.routes()
        if route.resource is not None
        and route.method == "GET"
        and route.resource.canonical.startswith(PREFIXES)
        and "{" not in route.resource.canonical
    }
    assert listings - set(LISTINGS) - NOT_LISTINGS == set(), "add these listings to LISTINGS"


#: GET routes without an id that list nothing owned.
NOT_LISTINGS = {"/v1/models"}
