"""The dashboard in a real headless Chromium, against the real API, worker, Redis and SQLite.

Given the API and a worker calling the fake LLM with some latency, when a person logs in and
browses, then the pages show their jobs; a job on screen finishes live (the event stream updates
the page, which is never reloaded); and the retry and cancel buttons act, and the page shows it.
"""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from playwright.async_api import Browser, Page, expect

from api import auth
from promptq.keys import KeyStore
from promptq.service import JobService
from promptq.testing.fake_llm import FakeLLM
from tests.conftest import ApiStarter, KeyFactory, WorkerFactory, bearer, wait_terminal

Client = TestClient[web.Request, web.Application]

#: The browser tests exercise the pages, not the database: SQLite only.
pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


async def submit(api: Client, content: str, key: str | None = None) -> str:
    """POST a prompt job and return its id."""
    body = {"kind": "prompt", "messages": [{"role": "user", "content": content}]}
    async with api.post("/api/jobs", json=body, headers=bearer(key) if key else {}) as response:
        assert response.status == 202, await response.text()
        return str((await response.json())["id"])


def url(api: Client, path: str) -> str:
    """The address of a path on the API under test."""
    return str(api.make_url(path))


async def mark_page(page: Page) -> None:
    """Tag the loaded document, so a test can tell a live update from a reload."""
    await page.evaluate("window.__loadedOnce = true")


async def assert_not_reloaded(page: Page) -> None:
    """The document tagged by mark_page is still the one on screen."""
    assert await page.evaluate("window.__loadedOnce === true"), "the page was reloaded"


async def test_log_in_and_browse_jobs_and_the_chart(
    page: Page,
    start_api: ApiStarter,
    make_key: KeyFactory,
    start_worker: WorkerFactory,
    service: JobService,
) -> None:
    # Given a key with two finished jobs, one of them failed for good
    api = await start_api()
    key = await make_key("alice")
    ok = await submit(api, "Write a welcome message for Alice.", key)
    bad = await submit(api, "this one is refused [[fake: 400]]", key)
    await start_worker()
    await wait_terminal(service.store, [ok, bad])

    # When she opens the job list, then she is sent to log in, and back after it
    await page.goto(url(api, "/jobs"))
    await expect(page).to_have_url(url(api, "/login?next=/jobs"))
    await page.fill("input[name=key]", "pq_wrong" + "x" * 40)
    await page.click("button[type=submit]")
    await expect(page.locator("#login-error")).to_contain_text("not valid")
    await page.fill("input[name=key]", key)
    await page.click("button[type=submit]")
    await expect(page).to_have_url(url(api, "/jobs"))
    await expect(page.locator("header .who")).to_have_text("alice")

    # Then both jobs are listed, and the status filter narrows the list
    rows = page.locator("table.jobs tbody tr[data-job-id]")
    await expect(rows).to_have_count(2)
    await page.select_option("select[name=status]", "failed")
    await page.click("form.filters button[type=submit]")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_attribute("data-job-id", bad)

    # And the failed job's page shows its input, its error and its attempt
    await rows.first.locator("a").first.click()
    await expect(page.locator("#job-status")).to_have_attribute("data-status", "failed")
    await expect(page.locator(".message pre")).to_contain_text("this one is refused")
    await expect(page.locator("#job-error")).to_contain_text("400")
    await expect(page.locator("table.attempts tbody tr[data-attempt]")).to_have_count(1)

    # And the overview's chart has drawn both finished jobs
    await page.click("nav >> text=Overview")
    await expect(page.locator("#chart")).to_have_attribute("data-finished", "2")
    await expect(page.locator('.card[data-count="succeeded"] .n')).to_have_text("1")


async def test_a_job_finishes_live_on_its_page_and_in_the_list(
    browser: Browser,
    start_api: ApiStarter,
    start_worker: WorkerFactory,
    fake_llm: FakeLLM,
) -> None:
    # Given the local demo set-up (auth disabled) and a model that takes 1.5 s to answer
    fake_llm.config.latency_ms = 1500
    api = await start_api(auth_disabled=True)
    job_id = await submit(api, "Summarize the news in one line.")
    context = await browser.new_context()
    detail, listing = await context.new_page(), await context.new_page()

    # When the job's page and the job list are open, listening to the event stream
    await detail.goto(url(api, f"/jobs/{job_id}"))
    await listing.goto(url(api, "/jobs"))
    for page in (detail, listing):
        await expect(page.locator("body")).to_have_attribute("data-live", "on")
        await mark_page(page)
    await expect(detail.locator("#job-status")).to_have_attribute("data-status", "queued")

    # And a worker picks the job up
    await start_worker()

    # Then both pages show it running, then succeeded with its result, without a reload
    await expect(detail.locator("#job-status")).to_have_attribute("data-status", "running")
    await expect(detail.locator("#job-status")).to_have_attribute("data-status", "succeeded")
    await expect(detail.locator("#job-result")).not_to_be_empty()
    await expect(detail.locator("table.attempts .outcome-succeeded")).to_have_count(1)
    row = listing.locator(f'tr[data-job-id="{job_id}"]')
    await expect(row).to_have_attribute("data-status", "succeeded")
    for page in (detail, listing):
        await assert_not_reloaded(page)
    await context.close()


async def test_an_open_page_goes_to_the_login_once_its_key_is_revoked(
    page: Page,
    start_api: ApiStarter,
    make_key: KeyFactory,
    service: JobService,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a logged-in person on the job list, listening to the event stream
    monkeypatch.setattr(auth, "KEY_RECHECK_S", 0.2)
    api = await start_api(api_key_cache_s=0)
    key = await make_key("bob")
    await page.goto(url(api, "/login?next=/jobs"))
    await page.fill("input[name=key]", key)
    await page.click("button[type=submit]")
    await expect(page.locator("body")).to_have_attribute("data-live", "on")

    # When the key is revoked, then the page goes to the login by itself, to come back after
    await KeyStore(service.store.sessionmaker).revoke("bob")
    await expect(page).to_have_url(url(api, "/login?next=/jobs"))


async def test_retry_a_failed_job_from_its_page(
    page: Page,
    start_api: ApiStarter,
    make_key: KeyFactory,
    start_worker: WorkerFactory,
    service: JobService,
) -> None:
    # Given a logged-in user's job that failed (the model refused it once)
    api = await start_api()
    key = await make_key("bob")
    job_id = await submit(api, "refused once [[fake: 400, ok]]", key)
    await start_worker()
    await wait_terminal(service.store, [job_id])
    await page.goto(url(api, f"/login?next=/jobs/{job_id}"))
    await page.fill("input[name=key]", key)
    await page.click("button[type=submit]")
    await expect(page.locator("#job-status")).to_have_attribute("data-status", "failed")
    await expect(page.locator("body")).to_have_attribute("data-live", "on")
    await mark_page(page)

    # When Retry is clicked
    await page.click("button[data-action=retry]")

    # Then the job runs again and succeeds, on the same page, with both attempts listed
    await expect(page.locator("#job-status")).to_have_attribute("data-status", "succeeded")
    await expect(page.locator("table.attempts tbody tr[data-attempt]")).to_have_count(2)
    await expect(page.locator("button[data-action=retry]")).to_have_count(0)
    await expect(page.locator("#flash")).to_be_hidden()
    await assert_not_reloaded(page)
    row = await service.store.get_job(job_id)
    assert row is not None and row.status == "succeeded" and row.attempts == 2


async def test_cancel_a_running_job_then_retry_it_from_the_list(
    page: Page, start_api: ApiStarter, start_worker: WorkerFactory
) -> None:
    # Given the job list showing a job whose model call never returns
    api = await start_api(auth_disabled=True)
    job_id = await submit(api, "never answered [[fake: hang]]")
    await start_worker()
    await page.goto(url(api, "/jobs"))
    row = page.locator(f'tr[data-job-id="{job_id}"]')
    await expect(row).to_have_attribute("data-status", "running")
    await mark_page(page)

    # When Cancel is clicked, then the worker aborts it and the row says cancelled
    await row.locator("button[data-action=cancel]").click()
    await expect(row).to_have_attribute("data-status", "cancelled")

    # And when Retry is clicked, it runs again
    await row.locator("button[data-action=retry]").click()
    await expect(row).to_have_attribute("data-status", "running")
    await expect(row.locator("td", has_text="2/")).to_have_count(1)
    await assert_not_reloaded(page)


async def test_cancel_a_batch_from_the_overview(page: Page, start_api: ApiStarter) -> None:
    # Given a batch of three queued jobs (no worker runs)
    api = await start_api(auth_disabled=True)
    jobs = [
        {"kind": "prompt", "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)
    ]
    async with api.post("/api/batches", json={"name": "to-cancel", "jobs": jobs}) as response:
        assert response.status == 201, await response.text()
        batch_id = (await response.json())["id"]
    await page.goto(url(api, "/"))
    row = page.locator(f'tr[data-batch-id="{batch_id}"]')
    await expect(row.locator(".progress-text")).to_have_text("0/3 (0%)")
    await mark_page(page)

    # When its Cancel is clicked, then all three are cancelled and the batch is finished
    await row.locator("button[data-action=cancel-batch]").click()
    await expect(row.locator('[data-count="cancelled"]')).to_have_text("cancelled 3")
    await expect(row.locator(".progress-text")).to_have_text("3/3 (100%)")
    await expect(row.locator("button[data-action=cancel-batch]")).to_have_count(0)
    await assert_not_reloaded(page)
