"""Schemathesis against the spec the real API serves, with a real worker, DB, Redis, fake LLM.

Given `promptq api` and `promptq worker` subprocesses and a (non-admin) API key, when
schemathesis generates valid and invalid requests for every operation in `/openapi.json`, then
no request gets a 5xx, and every response has a documented status code, content type, headers
and a body that matches its schema. The run is bounded: a few examples per operation.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import aiohttp
import pytest

from promptq.testing.fake_llm import FakeLLM
from tests.e2e.conftest import Procs

# PostgreSQL only: the stricter of the two databases (NUL characters, integer widths), and one
# run keeps the suite quick; the other tests cover both.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.postgres,
    pytest.mark.parametrize("database_url", ["postgres"], indirect=True),
]

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)
#: Generated requests per operation and phase; enough to hit every boundary, quick to run.
MAX_EXAMPLES = 15
RUN_TIMEOUT_S = 240


async def test_the_served_spec_holds_under_schemathesis(
    procs: Procs, api_url: str, api_key: str, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    procs.start("worker", "--concurrency", "4", name="worker")
    async with aiohttp.ClientSession() as session, session.get(f"{api_url}/openapi.json") as r:
        assert r.status == 200
        spec = await r.json()
    assert spec["openapi"].startswith("3.1")

    run = await asyncio.create_subprocess_exec(
        SCHEMATHESIS,
        "run",
        f"{api_url}/openapi.json",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        "6",
        # One worker thread: with two, hypothesis parses lambdas' source (ast) in both threads
        # at once, which CPython 3.11 can fail with "AST constructor recursion depth mismatch".
        "--workers",
        "1",
        "--request-timeout",
        "20",
        "--generation-database",
        "none",
        "--no-color",
        "--header",
        f"Authorization: Bearer {api_key}",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            output, _ = await run.communicate()
    finally:
        if run.returncode is None:
            run.kill()
            await run.wait()
    report = output.decode(errors="replace")
    assert run.returncode == 0, report + procs.logs()
    assert re.search(r"\b(\d+) generated, \1 passed\b", report), report
    # No request crashed a handler, even one that ended in a 4xx
    assert "unhandled error" not in procs.logs(), procs.logs()
