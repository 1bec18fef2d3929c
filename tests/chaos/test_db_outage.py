"""Lose the database in the middle of a batch: stop PostgreSQL, start it again.

Given the API and a `promptq worker` on a PRIVATE PostgreSQL cluster (so the shared server is
never touched), when PostgreSQL is stopped (`pg_ctl stop -m fast`) mid-batch and started again
a few seconds later, then meanwhile the API answers 503 with Retry-After (a JSON error, not a
traceback) and /healthz says the database is down; the worker keeps the answers it already
has and writes them once the database is back; the API heals by itself; and every job ends
succeeded exactly once, with one model call per attempt on record.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from promptq import migrate
from promptq.db import create_engine, create_sessionmaker
from promptq.models import AttemptOutcome, JobStatus
from promptq.queue import QueueClient
from promptq.service import JobService
from promptq.store import JobStore
from promptq.testing.fake_llm import FakeLLM, expected_reply
from tests.chaos.conftest import RedisServer, all_attempts, all_jobs, wait_all_terminal
from tests.conftest import base_settings, wait_for
from tests.e2e.conftest import Procs, free_port, wait_healthy
from tests.services import port_open, wait_port

pytestmark = pytest.mark.chaos

PG_BIN = Path("/usr/lib/postgresql/15/bin")
JOBS = 60
#: How long PostgreSQL stays down: shorter than the lease, so no job changes hands and every
#: answer a worker got during the outage must be the one recorded.
OUTAGE_S = 4.0


@dataclass
class PostgresCluster:
    """A throw-away PostgreSQL cluster of our own (trust auth, no fsync)."""

    datadir: Path
    port: int

    def _run(self, *args: str) -> None:
        command = [str(PG_BIN / args[0]), *args[1:]]
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    @property
    def dsn(self) -> str:
        """asyncpg DSN of the `postgres` database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        """SQLAlchemy URL of a database on this cluster."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        """initdb."""
        self._run("initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust", "-N")

    def start(self) -> None:
        """Start it and wait until it listens."""
        options = (
            f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off"
        )
        log = self.datadir / "server.log"
        self._run("pg_ctl", "-D", str(self.datadir), "-o", options, "-l", str(log), "-w", "start")
        if not wait_port("127.0.0.1", self.port, 20):
            raise RuntimeError("private PostgreSQL did not start")

    def stop(self) -> None:
        """`pg_ctl stop -m fast`: disconnect every client and shut down."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop")
        assert not port_open("127.0.0.1", self.port)


@pytest.fixture
def private_postgres() -> Iterator[PostgresCluster]:
    """A fresh private cluster on a free port, removed after the test."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"initdb is not available in {PG_BIN}")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root, and runuser is unavailable to run initdb as postgres")
    # Not under tmp_path: as root that is private to root, and the server runs as postgres.
    workdir = Path(tempfile.mkdtemp(prefix="promptq-pg-"))
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres", "postgres")
    cluster = PostgresCluster(workdir / "data", free_port())
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        if (cluster.datadir / "postmaster.pid").exists():
            with_suppressed(cluster.stop)
        shutil.rmtree(workdir, ignore_errors=True)


def with_suppressed(action: object) -> None:
    """Run a clean-up step; a failure there must not hide the test's own."""
    try:
        action()  # type: ignore[operator]
    except Exception as exc:
        print(f"clean-up failed: {exc!r}")


@pytest.mark.timeout(120)
async def test_a_database_outage_mid_batch_loses_nothing(
    private_postgres: PostgresCluster,
    private_redis: RedisServer,
    fake_llm: FakeLLM,
    tmp_path: Path,
) -> None:
    conn = await asyncpg.connect(private_postgres.dsn)
    await conn.execute("CREATE DATABASE promptq")
    await conn.close()
    settings = base_settings(
        tmp_path,
        private_postgres.url("promptq"),
        redis_url=private_redis.url,
        llm_base_url=fake_llm.base_url,
        api_port=free_port(),
        auth_disabled=True,
    )
    await asyncio.to_thread(migrate.upgrade, settings)
    fake_llm.config.latency_ms, fake_llm.config.jitter = 600, 0.3
    procs = Procs(settings, tmp_path)
    base = f"http://127.0.0.1:{settings.api_port}"
    engine = create_engine(settings)
    queue = await QueueClient.connect(settings)
    service = JobService(settings, JobStore(create_sessionmaker(engine)), queue)
    try:
        api = procs.start("api", "--port", str(settings.api_port), name="api")
        await wait_healthy(base, api)
        contents = [f"db outage job {i}" for i in range(JOBS)]
        async with aiohttp.ClientSession() as http:
            ids = [await submit(http, base, content) for content in contents]
            worker = procs.start("worker", "--concurrency", "6", name="worker")

            async def in_flight() -> bool:
                return fake_llm.stats.in_flight >= 4 and fake_llm.stats.total_requests >= 12

            await wait_for(in_flight, timeout_s=30, interval_s=0.02)
            await asyncio.to_thread(private_postgres.stop)
            down_at = time.monotonic()
            await engine.dispose()  # the test's own pooled connections are dead too

            # The API says so, politely: 503, Retry-After, a JSON error.
            async with http.post(f"{base}/api/jobs", json=body("during the outage")) as resp:
                assert resp.status == 503, await resp.text()
                assert resp.headers.get("Retry-After")
                assert (await resp.json())["error"]["code"] == "service_unavailable"
            async with http.get(f"{base}/api/jobs/{ids[0]}") as resp:
                assert resp.status == 503 and resp.headers.get("Retry-After")
            async with http.get(f"{base}/healthz") as resp:
                assert resp.status == 503
                assert "database" in (await resp.json())["error"]["message"]
            await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
            await asyncio.to_thread(private_postgres.start)

            # The API heals by itself; the worker writes what it kept, then finishes the batch.
            await wait_healthy(base, api, timeout_s=20)
            ids.append(await submit(http, base, "after the outage"))
            contents.append("after the outage")
            try:
                await wait_all_terminal(service, timeout_s=60)
            except TimeoutError:
                print(procs.logs())
                raise
        assert worker.poll() is None, "the worker exited:\n" + procs.logs()
        worker_log = (tmp_path / "worker.log").read_text()
        assert "database unavailable" in worker_log
        api_log = (tmp_path / "api.log").read_text()
        assert "Traceback" not in api_log, api_log[-4000:]

        rows = await all_jobs(service)
        history: dict[str, list[str]] = {}
        for attempt in sorted(await all_attempts(service), key=lambda a: (a.job_id, a.number)):
            history.setdefault(attempt.job_id, []).append(attempt.outcome)
        asked = fake_llm.stats.requests_by_prompt
        assert len(rows) == len(ids) == JOBS + 1
        for content, job_id in zip(contents, ids, strict=True):
            row = rows[job_id]
            assert row.status == JobStatus.SUCCEEDED, (content, row.status, history[job_id])
            assert row.result == expected_reply(
                "fake-small", [{"role": "user", "content": content}]
            )
            outcomes = Counter(history[job_id])
            assert outcomes[AttemptOutcome.SUCCEEDED] == 1, (content, history[job_id])
            assert row.attempts == len(history[job_id]) == asked[content], content
            # Down for less than a lease: no job changed hands, no answer was thrown away.
            assert row.attempts == 1 and row.interruptions == 0, (content, history[job_id])
    finally:
        procs.stop_all()
        await queue.close()
        await engine.dispose()


def body(content: str) -> dict[str, object]:
    """A prompt job request body."""
    return {"kind": "prompt", "messages": [{"role": "user", "content": content}]}


async def submit(http: aiohttp.ClientSession, base: str, content: str) -> str:
    """POST a job; its id."""
    async with http.post(f"{base}/api/jobs", json=body(content)) as resp:
        assert resp.status == 202, await resp.text()
        job_id: str = (await resp.json())["id"]
        return job_id
