"""The dashboard's routes on the real app, without a browser, over real Redis and SQL.

Given the API app with its dashboard, when pages are requested with and without a key, then
they render only what the caller may see: filters narrow the listing, another tenant's job and
batch are 404, a browser without a key is sent to the login page, the login cookie is HttpOnly
and SameSite=Strict, and a cookie alone cannot make a change without the CSRF header.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from sqlalchemy import update
from yarl import URL

from api import auth
from api.auth import CSRF_HEADER, KEY_COOKIE
from promptq import clock
from promptq.keys import KeyStore
from promptq.models import Batch, Job, JobStatus
from promptq.service import JobService, parse_job_request
from promptq.testing.fake_llm import FakeLLM
from tests.conftest import ApiStarter, KeyFactory, WorkerFactory, bearer, wait_terminal
from tests.summaries import generate_document

Client = TestClient[web.Request, web.Application]


def prompt(content: str, **extra: Any) -> dict[str, Any]:
    """A prompt job request with one user message."""
    return {"kind": "prompt", "messages": [{"role": "user", "content": content}], **extra}


async def submit(api: Client, key: str | None, content: str, **extra: Any) -> str:
    """POST a prompt job (as `key`, or with no header) and return its id."""
    headers = bearer(key) if key else {}
    async with api.post("/api/jobs", json=prompt(content, **extra), headers=headers) as response:
        assert response.status == 202, await response.text()
        return str((await response.json())["id"])


async def set_status(service: JobService, job_ids: list[str], status: JobStatus) -> None:
    """Put jobs into a status directly in SQL (test setup: what a worker would have written)."""
    async with service.store.sessionmaker() as session, session.begin():
        await session.execute(
            update(Job)
            .where(Job.id.in_(job_ids))
            .values(status=status, finished_at=clock.now() if status.is_terminal else None)
        )


async def make_batch(
    service: JobService, job_ids: list[str], *, name: str, owner_key_id: str | None
) -> str:
    """A batch row holding the given jobs, as `POST /api/batches` would store it."""
    now = clock.now()
    batch = Batch(
        id=clock.new_id(),
        api="native",
        name=name,
        status="in_progress",
        job_count=len(job_ids),
        owner_key_id=owner_key_id,
        created_at=now,
        updated_at=now,
    )
    async with service.store.sessionmaker() as session, session.begin():
        session.add(batch)
    async with service.store.sessionmaker() as session, session.begin():
        for index, job_id in enumerate(job_ids):
            await session.execute(
                update(Job).where(Job.id == job_id).values(batch_id=batch.id, batch_index=index)
            )
    return batch.id


async def key_id(service: JobService, key: str) -> str:
    """The id of an API key, as stored in jobs.owner_key_id."""
    found = await KeyStore(service.store.sessionmaker).authenticate(key)
    assert found is not None and found.key_id is not None
    return found.key_id


async def page(api: Client, path: str, **kw: Any) -> tuple[int, str]:
    """GET a page without following redirects; (status, body or Location)."""
    async with api.get(path, allow_redirects=False, **kw) as response:
        if 300 <= response.status < 400:
            return response.status, response.headers["Location"]
        return response.status, await response.text()


def login_url(then: str) -> str:
    """Where a page redirects a browser without a (valid) key."""
    return str(URL("/login").with_query(next=then))


def listed_ids(html: str) -> set[str]:
    """The job ids of a rendered job table."""
    return set(re.findall(r'data-job-id="([0-9a-f-]{36})"', html))


async def login(api: Client, key: str) -> ClientResponse:
    """Post the login form; the client's cookie jar keeps the cookie."""
    async with api.post(
        "/login", data={"key": key, "next": "/jobs"}, allow_redirects=False
    ) as response:
        await response.read()
        return response


# -- auth disabled: the local demo -------------------------------------------------------------


async def test_pages_render_and_filters_narrow_the_listing(
    start_api: ApiStarter, service: JobService
) -> None:
    # Given jobs of two models, some failed, three of them in a batch (auth disabled: no login)
    api = await start_api(auth_disabled=True)
    small = [await submit(api, None, f"small {i}", model="fake-small") for i in range(3)]
    large = [await submit(api, None, f"large {i}", model="fake-large") for i in range(2)]
    await set_status(service, [small[0], large[0]], JobStatus.FAILED)
    batch_id = await make_batch(service, small, name="nightly", owner_key_id=None)

    # Then the login page is not needed, and the overview shows the batch and the counts
    assert await page(api, "/login") == (302, "/")
    status, html = await page(api, "/")
    assert status == 200 and "nightly" in html and batch_id in html
    assert 'data-count="failed"><span class="n">2</span>' in html
    assert re.search(r'<progress max="3" value="1">', html), "1 of the batch's 3 jobs is finished"

    # And each filter narrows the listing to exactly the matching jobs
    cases = {
        "": {*small, *large},
        "?status=failed": {small[0], large[0]},
        "?model=fake-large": set(large),
        f"?batch={batch_id}": set(small),
        f"?batch={batch_id}&status=queued": set(small[1:]),
        "?status=failed&model=fake-small": {small[0]},
        "?kind=summarize": set(),
    }
    for query, expected in cases.items():
        status, html = await page(api, f"/jobs{query}")
        assert status == 200, html
        assert listed_ids(html) == expected, query

    # And the job's and the batch's own pages render, with the live part on its own too
    status, html = await page(api, f"/jobs/{small[0]}")
    assert status == 200 and "small 0" in html and 'data-action="retry"' in html
    status, partial = await page(api, f"/jobs/{small[0]}?partial=1")
    assert status == 200 and 'id="job-status" data-status="failed"' in partial
    assert "<html" not in partial
    status, html = await page(api, f"/batches/{batch_id}")
    assert status == 200 and listed_ids(html) == set(small)


async def test_bad_filters_are_a_clear_422_page_and_unknown_ids_a_404(
    start_api: ApiStarter,
) -> None:
    api = await start_api(auth_disabled=True)
    for query, word in (("status=bogus", "status"), ("batch=nope", "batch"), ("kind=x", "kind")):
        status, html = await page(api, f"/jobs?{query}")
        assert status == 422 and "<html" in html and "Bad request" in html, query
        assert re.search(rf'id="bad-request">[^<]*\b{word}\b', html), html
    # And the value typed is shown escaped, never as markup
    status, html = await page(api, "/jobs?status=%3Cscript%3Ex%3C/script%3E")
    assert status == 422 and "<script>x" not in html and "&lt;script&gt;x" in html
    async with api.get("/ui/chart?window=7y") as response:
        assert response.status == 422
    for path in ("/jobs/not-an-id", f"/jobs/{clock.new_id()}", "/batches/x", "/batches/" + "0" * 8):
        status, html = await page(api, path)
        assert status == 404 and "Not found" in html, path


async def test_pages_are_locked_down_with_a_content_security_policy(
    start_api: ApiStarter,
) -> None:
    api = await start_api(auth_disabled=True)
    async with api.get("/") as response:
        policy = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    # And the assets are served from the package itself
    for asset in ("/static/dashboard.js", "/static/dashboard.css"):
        async with api.get(asset) as response:
            assert response.status == 200 and len(await response.read()) > 1000


# -- auth on: login, cookie, CSRF, tenants ------------------------------------------------------


async def test_login_sets_an_httponly_samesite_cookie_that_the_api_accepts(
    start_api: ApiStarter, make_key: KeyFactory
) -> None:
    api = await start_api(api_key_cache_s=0)
    key = await make_key("browser")
    job_id = await submit(api, key, "mine")

    # Given no key, pages redirect to the login page (keeping where the user was going),
    # while the event stream, the chart data and unknown paths stay a plain 401
    assert await page(api, "/jobs?status=queued") == (302, login_url("/jobs?status=queued"))
    # (the live part a page's script fetches goes back to the whole page after the login)
    assert await page(api, "/jobs?status=queued&partial=1") == (
        302,
        login_url("/jobs?status=queued"),
    )
    for path in ("/ui/events", "/ui/chart", "/nope"):
        assert (await page(api, path))[0] == 401, path
    status, html = await page(api, "/login?next=/jobs")
    assert status == 200 and 'name="key"' in html

    # When a wrong key is posted, then 401 and no cookie
    response = await login(api, "pq_" + "x" * 43)
    assert response.status == 401 and KEY_COOKIE not in response.cookies

    # When the right key is posted, then a locked-down cookie, and on to `next`
    response = await login(api, key)
    assert (response.status, response.headers["Location"]) == (302, "/jobs")
    cookie = response.cookies[KEY_COOKIE]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    status, html = await page(api, "/jobs")
    assert status == 200 and job_id in listed_ids(html) and "browser" in html
    assert key not in html, "the key must never be written into a page"
    async with api.get(f"/api/jobs/{job_id}") as r:  # the cookie works on the API too
        assert r.status == 200

    # And logging out forgets it
    async with api.post("/logout", allow_redirects=False) as r:
        assert r.status == 302
    assert (await page(api, "/jobs"))[0] == 302


async def test_login_goes_on_to_pages_of_this_site_only(
    start_api: ApiStarter, make_key: KeyFactory
) -> None:
    api = await start_api()
    key = await make_key("browser")
    # Given `next` targets that a browser would send to another site (it drops tabs and
    # newlines, so "/\t/evil.example" is "//evil.example"), and ones of this site
    elsewhere = [
        "//evil.example/x",
        "/\t/evil.example/x",
        "/\n/evil.example",
        "/\\evil.example",
        "https://evil.example/",
        "/\r\n/evil.example",
        "/\x7f/evil.example",
    ]
    for target in [*elsewhere, "/jobs?status=failed", "/batches"]:
        # When a login is posted with it
        async with api.post(
            "/login", data={"key": key, "next": target}, allow_redirects=False
        ) as response:
            # Then the login goes there only if it is a page of this site
            assert response.status == 302, target
            expected = "/" if target in elsewhere else target
            assert response.headers["Location"] == expected, target


async def test_a_cookie_cannot_change_anything_without_the_csrf_header(
    start_api: ApiStarter, make_key: KeyFactory, service: JobService
) -> None:
    api = await start_api(api_key_cache_s=0)
    key = await make_key("browser")
    job_id = await submit(api, key, "to retry")
    await set_status(service, [job_id], JobStatus.FAILED)
    await login(api, key)

    # When the cookie alone asks for a retry (as a form on another site would), then 403
    async with api.post(f"/api/jobs/{job_id}/retry") as response:
        assert response.status == 403
        assert CSRF_HEADER in (await response.json())["error"]["message"]
    assert (await service.store.get_job(job_id)).status == "failed"  # type: ignore[union-attr]

    # And with the header, as the dashboard's script sends it, the retry happens
    async with api.post(f"/api/jobs/{job_id}/retry", headers={CSRF_HEADER: "1"}) as response:
        assert response.status == 202, await response.text()

    # And a login form posted from another site is refused
    async with api.post(
        "/login", data={"key": key}, headers={"Sec-Fetch-Site": "cross-site"}
    ) as response:
        assert response.status == 403


async def test_a_revoked_keys_cookie_is_sent_back_to_the_login_page(
    start_api: ApiStarter, make_key: KeyFactory, service: JobService
) -> None:
    api = await start_api(api_key_cache_s=0)
    key = await make_key("short-lived")
    await login(api, key)
    assert (await page(api, "/"))[0] == 200
    await KeyStore(service.store.sessionmaker).revoke("short-lived")
    assert await page(api, "/") == (302, login_url("/"))


async def test_another_tenants_jobs_and_batches_are_404_in_the_dashboard(
    start_api: ApiStarter, make_key: KeyFactory, service: JobService
) -> None:
    # Given tenant A's job in A's batch, tenant B's own job, and an admin
    api = await start_api(api_key_cache_s=0)
    tenant_a, tenant_b = await make_key("tenant-a"), await make_key("tenant-b")
    admin = await make_key("admin", admin=True)
    a_job = await submit(api, tenant_a, "a's secret prompt")
    b_job = await submit(api, tenant_b, "b's prompt")
    batch_id = await make_batch(
        service, [a_job], name="a-batch", owner_key_id=await key_id(service, tenant_a)
    )
    await set_status(service, [a_job], JobStatus.SUCCEEDED)

    # When B browses, then A's job and batch are 404 and never listed or counted
    headers = {"Cookie": f"{KEY_COOKIE}={tenant_b}"}
    missing = clock.new_id()
    for path in (f"/jobs/{a_job}", f"/batches/{batch_id}"):
        status, html = await page(api, path, headers=headers)
        assert status == 404 and "secret" not in html, path
        other_id = path.rsplit("/", 1)[1]
        same_as_missing = (await page(api, path.replace(other_id, missing), headers=headers))[1]
        assert html.replace(other_id, "ID") == same_as_missing.replace(missing, "ID")
    assert listed_ids((await page(api, "/jobs", headers=headers))[1]) == {b_job}
    assert listed_ids((await page(api, f"/jobs?batch={batch_id}", headers=headers))[1]) == set()
    overview = (await page(api, "/", headers=headers))[1]
    assert "a-batch" not in overview and 'data-count="succeeded"><span class="n">0<' in overview
    async with api.get("/ui/chart?window=15m", headers=headers) as response:
        assert sum(b["succeeded"] for b in (await response.json())["buckets"]) == 0

    # And A and the admin see it
    for key in (tenant_a, admin):
        headers = {"Cookie": f"{KEY_COOKIE}={key}"}
        status, html = await page(api, f"/jobs/{a_job}", headers=headers)
        assert status == 200 and "a&#39;s secret prompt" in html
        assert (await page(api, f"/batches/{batch_id}", headers=headers))[0] == 200
        async with api.get("/ui/chart?window=15m", headers=headers) as response:
            assert sum(b["succeeded"] for b in (await response.json())["buckets"]) == 1


async def test_every_dashboard_route_needs_a_key(start_api: ApiStarter) -> None:
    # Deny by default: each page and data route the dashboard adds refuses a caller without a
    # key (pages by sending the browser to the login page)
    api = await start_api()
    assert api.app is not None
    checked = 0
    for route in api.app.router.routes():
        name = route.name or ""
        if not name.startswith(("page:", "dashboard:")) or route.method == "HEAD":
            continue
        url = route.resource.canonical.replace("{id}", clock.new_id())  # type: ignore[union-attr]
        async with api.request(route.method, url, allow_redirects=False) as response:
            if name.startswith("page:"):
                assert response.status == 302, (route.method, url)
                assert response.headers["Location"].startswith("/login?next="), url
            else:
                assert response.status == 401, (route.method, url)
        checked += 1
    assert checked >= 6, "no dashboard routes found: is the enumeration broken?"


# -- live: the event stream and the chart ------------------------------------------------------


async def next_event(response: ClientResponse) -> tuple[str, Any]:
    """The next (event, data) of a server-sent event stream."""
    name = ""
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            return name, json.loads(line[len("data: ") :])
    raise AssertionError("the stream ended")


async def test_the_event_stream_reports_the_callers_job_changes_only(
    start_api: ApiStarter,
    make_key: KeyFactory,
    start_worker: WorkerFactory,
    fake_llm: FakeLLM,
    service: JobService,
) -> None:
    # Given tenant B watching the event stream
    api = await start_api(api_key_cache_s=0)
    tenant_a, tenant_b = await make_key("tenant-a"), await make_key("tenant-b")
    async with api.get("/ui/events", headers={"Cookie": f"{KEY_COOKIE}={tenant_b}"}) as stream:
        async with asyncio.timeout(10):
            assert await next_event(stream) == ("hello", {"live": True})
        # When A's job and then B's job run
        a_job = await submit(api, tenant_a, "a's")
        await start_worker()
        await wait_terminal(service.store, [a_job])
        b_job = await submit(api, tenant_b, "b's")

        # Then B hears of its own job until it succeeds, and never of A's
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(15):
            while not seen or seen[-1]["status"] != "succeeded":
                name, data = await next_event(stream)
                assert name == "job" and data["id"] == b_job, (name, data)
                seen.append(data)
        assert seen[-1]["attempts"] == 1


async def test_the_event_stream_ends_once_its_key_is_revoked(
    start_api: ApiStarter,
    make_key: KeyFactory,
    service: JobService,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a stream that re-checks its key often, opened with a key
    monkeypatch.setattr(auth, "KEY_RECHECK_S", 0.1)
    api = await start_api(api_key_cache_s=0)
    key = await make_key("short-lived")
    async with api.get("/ui/events", headers={"Cookie": f"{KEY_COOKIE}={key}"}) as stream:
        async with asyncio.timeout(10):
            assert await next_event(stream) == ("hello", {"live": True})
            # When the key is revoked while the stream is open
            await KeyStore(service.store.sessionmaker).revoke("short-lived")
            # Then the stream says so, and ends
            assert await next_event(stream) == ("revoked", {})
            assert (await stream.content.read()).strip() == b""  # the rest of the event


async def test_the_chart_counts_finished_jobs_and_attempt_latency(
    start_api: ApiStarter, start_worker: WorkerFactory, fake_llm: FakeLLM, service: JobService
) -> None:
    # Given two jobs that succeed and one that fails for good, on a model taking 50 ms
    fake_llm.config.latency_ms = 50
    api = await start_api(auth_disabled=True)
    ok = [await submit(api, None, f"ok {i}") for i in range(2)]
    bad = await submit(api, None, "bad [[fake: 400]]")
    await start_worker()
    await wait_terminal(service.store, [*ok, bad])

    # When the chart's data is read
    async with api.get("/ui/chart?window=15m") as response:
        assert response.status == 200
        data = await response.json()

    # Then the last quarter hour holds them, bucketed, with the attempts' latency
    buckets = data["buckets"]
    assert data["bucket_s"] == 15 and len(buckets) in (60, 61)
    assert [b["t"] for b in buckets] == sorted(b["t"] for b in buckets)
    assert sum(b["succeeded"] for b in buckets) == 2
    assert sum(b["failed"] for b in buckets) == 1
    assert sum(b["attempts"] for b in buckets) == 3
    timed = [b for b in buckets if b["attempts"]]
    assert all(b["max_latency_ms"] >= 50 and b["mean_latency_ms"] >= 50 for b in timed), timed


async def test_the_cli_s_jobs_show_for_the_local_operator(
    start_api: ApiStarter, service: JobService
) -> None:
    # Jobs made by the CLI have no owner; with auth disabled the dashboard shows them
    job, _ = await service.submit(parse_job_request(prompt("from the cli")))
    api = await start_api(auth_disabled=True)
    status, html = await page(api, "/jobs")
    assert status == 200 and listed_ids(html) == {job.id}


async def test_a_summarize_jobs_page_lists_its_chunks(
    start_api: ApiStarter, start_worker: WorkerFactory, service: JobService
) -> None:
    # Given a document too long for one call, summarized through map and reduce calls
    api = await start_api(auth_disabled=True)
    body = {"kind": "summarize", "document": generate_document(3_000), "context_window": 1024}
    async with api.post("/api/jobs", json=body) as response:
        assert response.status == 202, await response.text()
        job_id = (await response.json())["id"]
    await start_worker()
    await wait_terminal(service.store, [job_id], timeout_s=60)

    # Then its page lists every chunk the job planned, map calls and reduce calls
    chunks = await service.checkpoints.list_chunks(job_id)
    assert len(chunks) > 2 and {c.level for c in chunks} >= {0, 1}
    status, html = await page(api, f"/jobs/{job_id}")
    assert status == 200 and 'data-status="succeeded"' in html
    rows = re.findall(r'data-chunk="(\d+)-(\d+)"', html)
    assert sorted(rows) == sorted((str(c.level), str(c.chunk_index)) for c in chunks)
    assert "(map)" in html and "(reduce)" in html
