"""End to end: a `promptq api` told to stop (SIGTERM) while requests wait on it.

Given a real API process with no worker, and open on it a job's event stream, the dashboard's
live feed, a chat completion and a streamed chat completion (each waiting for a job nobody
runs), when it gets SIGTERM, then it exits within its grace (`PROMPTQ_API_SHUTDOWN_GRACE_S`)
instead of waiting out the chat wait (minutes): the streams are closed (the Python client's
`stream()` raises ServiceUnavailable), the chat completions get a 503 naming their job, and
every job is still queued in SQL, its request intact.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from typing import Any

import aiohttp
import pytest

from promptq.client import PromptQClient
from promptq.errors import ServiceUnavailable
from promptq.models import JobStatus
from promptq.service import JobService
from tests.conftest import wait_for
from tests.e2e.conftest import Procs, wait_healthy

pytestmark = [
    pytest.mark.e2e,
    # The shutdown is the API's own: one database is enough.
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

GRACE_S = 2.0


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fake-small", "messages": [{"role": "user", "content": content}]} | extra


async def chat(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(f"{url}/v1/chat/completions", json=body) as response:
        return response.status, (await response.json(content_type=None), response.headers)


async def test_sigterm_ends_waiting_requests_within_the_grace_and_loses_no_job(
    procs: Procs, api_key: str, service: JobService
) -> None:
    procs.settings = procs.settings.with_overrides(api_shutdown_grace_s=GRACE_S, chat_wait_s=600.0)
    port = procs.settings.api_port
    url = f"http://127.0.0.1:{port}"
    proc = procs.start("api", "--port", str(port), name="api")
    await wait_healthy(url, proc)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with (
        PromptQClient(url, api_key=api_key) as client,
        aiohttp.ClientSession(headers=headers) as http,
    ):
        # Given a queued job whose stream is open, the dashboard's feed, and two chat requests
        job = await client.submit_prompt("nobody runs this", model="fake-small")
        first_event: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def follow() -> list[str]:
            seen = []
            async for event in client.stream(job["id"]):
                seen.append(event.event)
                if not first_event.done():
                    first_event.set_result(event.event)
            return seen

        streaming = asyncio.create_task(follow())
        feed = await http.get(f"{url}/ui/events")
        assert feed.status == 200 and b"hello" in await feed.content.readuntil(b"\n\n")
        waiting = asyncio.create_task(chat(http, url, chat_body("wait for me")))
        streamed = asyncio.create_task(chat(http, url, chat_body("stream me", stream=True)))
        assert await asyncio.wait_for(first_event, 20) == "status"

        async def chats_queued() -> bool:
            jobs = await service.store.list_jobs(limit=10)
            return len(jobs) == 3

        await wait_for(chats_queued, timeout_s=20)

        # When the API gets SIGTERM
        proc.send_signal(signal.SIGTERM)

        # Then it exits within its grace, not after the chat wait (or aiohttp's 60 s default)
        try:
            code = await asyncio.to_thread(proc.wait, GRACE_S + 10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the API was still running well past its grace\n{procs.logs()}")
        assert code == 0, procs.logs()

        # The job stream was closed, and the client says so rather than ending quietly
        with pytest.raises(ServiceUnavailable, match="ended before the job"):
            await asyncio.wait_for(streaming, 10)
        # The dashboard's feed was cut (its browser reconnects)
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(feed.content.read(), 10)
        feed.close()

        # Each chat completion got a 503 naming its job, which goes on
        for task in (waiting, streamed):
            status, (body, response_headers) = await asyncio.wait_for(task, 10)
            assert status == 503, body
            job_id = response_headers["x-promptq-job-id"]
            assert body["error"]["code"] == "shutting_down"
            assert f"/api/jobs/{job_id}" in body["error"]["message"]

    # And no job was lost: all three are queued in SQL with their requests
    jobs = {j.input["messages"][0]["content"]: j for j in await service.store.list_jobs(limit=10)}
    assert set(jobs) == {"nobody runs this", "wait for me", "stream me"}
    assert {j.status for j in jobs.values()} == {JobStatus.QUEUED}
    assert "Traceback" not in (procs.tmp / "api.log").read_text()
