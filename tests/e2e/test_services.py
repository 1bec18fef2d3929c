"""End to end: real `promptq api` and `promptq worker` processes, the fake LLM, the CLI.

Given a mix of prompts scripted to succeed, fail transiently or fail permanently, when they go
through the real services, then every job ends right and its attempts match the server's count.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest

from promptq.client import PromptQClient
from promptq.testing.fake_llm import FakeLLM, expected_reply
from tests.e2e.conftest import Procs

pytestmark = pytest.mark.e2e

CASES: list[tuple[str, str, int, int]] = [
    # (content, expected status, expected attempts, max_attempts)
    *[(f"welcome e2e user {i}", "succeeded", 1, 5) for i in range(12)],
    ("flaky [[fake: 500, 429:retry_after=0.1, ok]]", "succeeded", 3, 5),
    ("broken body [[fake: malformed, drop, ok]]", "succeeded", 3, 5),
    ("slow [[fake: hang, ok]]", "succeeded", 2, 5),
    ("bad request [[fake: 400]]", "failed", 1, 5),
    ("no such model [[fake: 404]]", "failed", 1, 5),
    ("always down [[fake: 503]]", "failed", 3, 3),
]


def messages(content: str) -> list[dict[str, Any]]:
    """One user message."""
    return [{"role": "user", "content": content}]


async def test_jobs_through_real_processes(
    procs: Procs, api_url: str, api_key: str, fake_llm: FakeLLM
) -> None:
    worker = procs.start("worker", "--concurrency", "4", name="worker")
    async with PromptQClient(api_url, api_key=api_key) as client:
        jobs = [
            await client.submit_prompt(content, max_attempts=max_attempts)
            for content, _, _, max_attempts in CASES
        ]
        try:
            done = [await client.wait(job["id"], timeout_s=60, poll_s=0.05) for job in jobs]
        except TimeoutError:
            print(procs.logs())
            raise
        histories = [await client.attempts(job["id"]) for job in jobs]

    for (content, status, attempts, _), job, history in zip(CASES, done, histories, strict=True):
        assert job["status"] == status, (content, job, procs.logs())
        assert job["attempts"] == attempts == fake_llm.stats.requests_by_prompt[content], content
        assert [a["number"] for a in history] == list(range(1, attempts + 1))
        if status == "succeeded":
            assert job["result"] == expected_reply("fake-small", messages(content))
            assert job["usage"]["completion_tokens"] > 0
        else:
            assert job["error"] and job["error"] == history[-1]["error"]
    assert fake_llm.stats.peak_in_flight <= 4

    # SIGTERM stops the worker cleanly.
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0, procs.logs()


async def test_cli_submit_wait_get_and_list(procs: Procs, fake_llm: FakeLLM) -> None:
    procs.start("worker", name="worker")

    submitted = await procs.run("submit", "prompt", "hello from the cli", "--wait")
    assert submitted.returncode == 0, submitted.stderr + procs.logs()
    assert expected_reply("fake-small", messages("hello from the cli")) in submitted.stdout

    failed = await procs.run("submit", "prompt", "cli fails [[fake: 401]]", "--wait")
    assert failed.returncode == 1
    assert "failed after 1 attempt" in failed.stderr

    queued = await procs.run("submit", "prompt", "just queue it")
    assert queued.returncode == 0
    job_id = queued.stdout.split()[0]

    listing = await procs.run("list", "--status", "failed")
    assert listing.returncode == 0 and "prompt" in listing.stdout and "failed" in listing.stdout

    shown = await _wait_json(procs, job_id)
    assert shown["status"] == "succeeded"
    assert shown["result"] == expected_reply("fake-small", messages("just queue it"))
    assert [a["outcome"] for a in shown["attempt_history"]] == ["succeeded"]


async def _wait_json(procs: Procs, job_id: str) -> dict[str, Any]:
    for _ in range(60):  # each poll is a full CLI round-trip
        got = await procs.run("get", job_id, "--json")
        assert got.returncode == 0, got.stderr
        data: dict[str, Any] = json.loads(got.stdout)
        if data["status"] in {"succeeded", "failed", "cancelled"}:
            return data
    raise AssertionError(f"job {job_id} did not finish")


async def test_cli_reports_bad_input_clearly(procs: Procs) -> None:
    missing = await procs.run("get", "00000000-0000-7000-8000-000000000000")
    assert missing.returncode == 2 and "no job with id" in missing.stderr
    assert "Traceback" not in missing.stderr

    bad_status = await procs.run("list", "--status", "nope")
    assert bad_status.returncode == 2 and "status must be one of" in bad_status.stderr
    bad_kind = await procs.run("list", "--kind", "translate")
    assert bad_kind.returncode == 2 and "kind must be one of" in bad_kind.stderr

    no_file = await procs.run("submit", "summarize", "/nonexistent/file.txt")
    assert no_file.returncode == 2 and "cannot read" in no_file.stderr

    bad_temperature = await procs.run("submit", "prompt", "x", "--max-attempts", "0")
    assert bad_temperature.returncode == 2


async def test_demo_runs_end_to_end_on_the_builtin_model(procs: Procs) -> None:
    # No LLM configured, (on CI) no Ollama, and the bundled model turned off: the demo must
    # fall back to the built-in fake model, and say so.
    procs.settings = procs.settings.with_overrides(
        llm_base_url="http://localhost:11434/v1", bundled_llm=False
    )
    result = await procs.run("demo", "--compare", "3", timeout_s=120)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAKE model" in result.stdout and "CANNED" in result.stdout
    assert "23 jobs in" in result.stdout and "speed-up" in result.stdout
    listing = await procs.run("list", "--status", "succeeded", "--limit", "100")
    assert listing.stdout.count("succeeded") == 23 + 3
