"""`POST /api/jobs/{id}/retry` and `deadline_s` over HTTP, on SQLite and PostgreSQL.

Given the real API app and an in-process worker, when a failed job is retried over HTTP, then
it is accepted (202) and runs again; a job that is not failed or cancelled is a 409, an unknown
one a 404; the Python client raises the matching errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from api.app import create_app
from promptq.client import PromptQClient
from promptq.errors import JobNotRetryable, NotFound
from promptq.settings import Settings
from tests.conftest import KeyFactory, WorkerFactory, bearer

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def api(settings: Settings, make_key: KeyFactory) -> AsyncIterator[Client]:
    """An HTTP client (with an admin key) for the API running with this test's settings."""
    key = await make_key("retry-tests", admin=True)
    client: Client = TestClient(TestServer(create_app(settings)), headers=bearer(key))
    await client.start_server()
    yield client
    await client.close()


async def call(api: Client, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """Send a request; return (status, parsed JSON)."""
    async with api.request(method, path, json=body) as response:
        return response.status, await response.json()


def prompt_body(content: str, **extra: Any) -> dict[str, Any]:
    """A prompt job request."""
    return {"kind": "prompt", "messages": [{"role": "user", "content": content}], **extra}


async def test_retry_route_requeues_a_failed_job(api: Client, start_worker: WorkerFactory) -> None:
    status, job = await call(api, "POST", "/api/jobs", prompt_body("fails once [[fake: 400, ok]]"))
    assert status == 202
    await start_worker()
    async with PromptQClient(
        str(api.make_url("")), api_key=api.session.headers["Authorization"].removeprefix("Bearer ")
    ) as client:
        failed = await client.wait(job["id"], timeout_s=10, poll_s=0.05)
        assert failed["status"] == "failed"

        status, retried = await call(api, "POST", f"/api/jobs/{job['id']}/retry")
        assert status == 202
        assert retried["status"] == "queued" and retried["error"] is None
        assert retried["max_attempts"] == 1 + 5 and retried["attempts"] == 1

        done = await client.wait(job["id"], timeout_s=10, poll_s=0.05)
        assert done["status"] == "succeeded" and done["attempts"] == 2
        assert [a["outcome"] for a in await client.attempts(job["id"])] == [
            "permanent_error",
            "succeeded",
        ]
        with pytest.raises(JobNotRetryable, match="is succeeded"):
            await client.retry(job["id"])


async def test_retry_route_refuses_jobs_that_did_not_fail(api: Client) -> None:
    _, job = await call(api, "POST", "/api/jobs", prompt_body("queued"))

    status, body = await call(api, "POST", f"/api/jobs/{job['id']}/retry")
    assert status == 409 and body["error"]["code"] == "not_retryable"
    assert "only failed or cancelled" in body["error"]["message"]

    unknown = "00000000-0000-7000-8000-000000000000"
    status, body = await call(api, "POST", f"/api/jobs/{unknown}/retry")
    assert status == 404 and body["error"]["code"] == "not_found"
    async with PromptQClient(
        str(api.make_url("")), api_key=api.session.headers["Authorization"].removeprefix("Bearer ")
    ) as client:
        with pytest.raises(NotFound):
            await client.retry(unknown)


async def test_deadline_is_accepted_shown_and_validated(api: Client) -> None:
    status, job = await call(api, "POST", "/api/jobs", prompt_body("in time", deadline_s=90))
    assert status == 202 and job["deadline_s"] == 90 and job["deadline_at"] is not None

    for bad in (0, -1, "soon", 10**9):
        status, body = await call(api, "POST", "/api/jobs", prompt_body("x", deadline_s=bad))
        assert status == 422 and "deadline_s" in body["error"]["message"], bad
