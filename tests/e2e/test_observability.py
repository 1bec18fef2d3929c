"""End to end: JSON logs with job context, `worker --check`, and a worker's --metrics-port.

Given a real `promptq worker` process started with `--log-format json --metrics-port N` and an
LLM API key, when it runs a job that fails once and then succeeds, then every log line is a
JSON object, the lines written while it works on a job carry that job's id and attempt, the
key appears nowhere, its metrics endpoint counts the attempts, and `promptq worker --check`
follows the worker's life: 1 before it starts, 0 while it runs, 1 after it stops.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import aiohttp
import pytest

from promptq.schemas import PromptJobCreate
from promptq.service import JobService
from promptq.testing.fake_llm import FakeLLM
from tests.conftest import wait_terminal
from tests.e2e.conftest import Procs, free_port, wait_healthy

pytestmark = [
    pytest.mark.e2e,
    # Logs, heartbeats and metrics don't depend on the database: one backend is enough.
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

SECRET = "sk-e2e-secret-0123456789abcdef"


async def check(procs: Procs) -> tuple[int, str]:
    done = await procs.run("worker", "--check", timeout_s=30)
    return done.returncode, done.stdout.strip()


async def wait_check(procs: Procs, expected: int, timeout_s: float = 20) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        code, line = await check(procs)
        if code == expected:
            return line
        assert time.monotonic() < deadline, (code, line, procs.logs())


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # fails on any line that isn't JSON


async def test_json_logs_check_and_metrics_of_a_real_worker(
    procs: Procs, service: JobService, fake_llm: FakeLLM
) -> None:
    # DEBUG: the per-job lines (claim, success) are written too, and must carry the job id
    procs.settings = procs.settings.with_overrides(llm_api_key=SECRET, log_level="DEBUG")
    code, line = await check(procs)
    assert code == 1 and line.startswith("unhealthy:") and "\n" not in line

    port = free_port()
    worker = procs.start(
        "worker", "--log-format", "json", "--metrics-port", str(port), name="worker"
    )
    assert (await wait_check(procs, 0)).startswith("ok: 1 worker(s)")

    flaky = "[[fake: 500, ok]] tell me a joke"
    job, _ = await service.submit(
        PromptJobCreate.model_validate(
            {"kind": "prompt", "messages": [{"role": "user", "content": flaky}]}
        )
    )
    await wait_terminal(service.store, [job.id], timeout_s=30)
    assert fake_llm.stats.authorization_headers == {f"Bearer {SECRET}"}

    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    assert 'promptq_attempts_total{kind="prompt",outcome="succeeded",reason="none"} 1.0' in text
    assert 'promptq_retries_total{reason="http_500"} 1.0' in text

    worker.send_signal(signal.SIGTERM)
    await asyncio.to_thread(worker.wait, 20)
    assert worker.returncode == 0
    code, line = await check(procs)
    assert code == 1, line  # a stopped worker deletes its heartbeat

    log = (procs.tmp / "worker.log").read_text()
    assert SECRET not in log
    records = json_lines(log)
    assert {"ts", "level", "logger", "message"} <= set(records[0])
    # (aiosqlite's DEBUG lines come from its own thread, outside any job's task)
    about_job = [r for r in records if job.id in r["message"] and r["logger"] != "aiosqlite"]
    assert about_job, log
    for record in about_job:
        assert record.get("job_id") == job.id, (record, log)
        assert record["attempt"] in (1, 2, None), record  # None: before the claim
    attempts = {r["attempt"] for r in about_job if "job_id" in r}
    assert {1, 2} <= attempts, about_job
    assert not [r for r in records if r.get("job_id") not in (None, job.id)]


async def test_api_logs_json(procs: Procs) -> None:
    port = procs.settings.api_port
    proc = procs.start("api", "--port", str(port), "--log-format", "json", name="api")
    await wait_healthy(f"http://127.0.0.1:{port}", proc)
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"http://127.0.0.1:{port}/api/jobs", headers={"Authorization": "Bearer pq_" + "x" * 43}
        ) as response,
    ):
        assert response.status == 401
    proc.send_signal(signal.SIGTERM)
    await asyncio.to_thread(proc.wait, 20)
    records = json_lines((procs.tmp / "api.log").read_text())
    assert any("401" in r["message"] for r in records), records
    assert all("x" * 43 not in json.dumps(r) for r in records)
