"""Shared fixtures: real Redis, real SQLite and PostgreSQL, the fake LLM, and in-process workers.

Each test gets its own database (SQLite file copied from a migrated template, or a PostgreSQL
database cloned with CREATE DATABASE ... TEMPLATE) and a flushed Redis database.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from promptq import migrate
from promptq.db import create_engine, create_sessionmaker
from promptq.models import TERMINAL_STATUSES, JobStatus
from promptq.queue import QueueClient
from promptq.service import JobService
from promptq.settings import Settings
from promptq.store import JobStore
from promptq.testing.fake_llm import FakeLLM
from tests import services

PG_ADMIN_DSN = os.environ.get(
    "PROMPTQ_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
#: Checkouts of this repository that run their suites at the same time on one machine must not
#: share a Redis database or a PostgreSQL template, so both are derived from the checkout's path.
_CHECKOUT_SLOT = zlib.crc32(str(Path(__file__).resolve().parents[1]).encode()) % 14 + 1
#: Redis logical database the tests use; flushed before every test. PROMPTQ_TEST_REDIS_DB
#: picks another slot (Redis db and PostgreSQL template both) when two checkouts collide.
REDIS_TEST_DB = int(os.environ.get("PROMPTQ_TEST_REDIS_DB", str(_CHECKOUT_SLOT)))
PG_TEMPLATE = f"promptq_test_template_{REDIS_TEST_DB}"
REDIS_TEST_URL = f"redis://127.0.0.1:6379/{REDIS_TEST_DB}"

DB_BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def pg_url(database: str) -> str:
    """An asyncpg SQLAlchemy URL for a database on the test server."""
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{database}"


async def _pg_admin(*statements: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def base_settings(tmp: Path, database_url: str, **overrides: Any) -> Settings:
    """Settings for a test: fast retries, quick polling, no .env file."""
    values: dict[str, Any] = {
        "data_dir": tmp,
        "database_url": database_url,
        "redis_url": REDIS_TEST_URL,
        "queue_name": "promptq:test",
        "llm_base_url": "http://127.0.0.1:9/v1",
        "default_model": "fake-small",
        "llm_timeout_s": 5.0,
        "retry_base_s": 0.01,
        "retry_cap_s": 0.05,
        "worker_poll_delay_s": 0.01,
        "worker_concurrency": 10,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture(scope="session")
def redis_available() -> None:
    services.ensure_redis()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that each test copies."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    migrate.upgrade(base_settings(path.parent, f"sqlite+aiosqlite:///{path}"))
    return path


@pytest.fixture(scope="session")
def pg_template() -> str:
    """A migrated PostgreSQL template database that each test clones."""
    if not services.ensure_postgres():
        pytest.skip("PostgreSQL is not available on 127.0.0.1:5432")
    asyncio.run(
        _pg_admin(
            f"DROP DATABASE IF EXISTS {PG_TEMPLATE} WITH (FORCE)",
            f"CREATE DATABASE {PG_TEMPLATE}",
        )
    )
    migrate.upgrade(base_settings(Path("/tmp"), pg_url(PG_TEMPLATE)))
    return PG_TEMPLATE


@pytest.fixture(params=DB_BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database for one test: SQLite or PostgreSQL."""
    if request.param == "sqlite":
        path = tmp_path / "promptq.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    template = request.getfixturevalue("pg_template")
    name = f"promptq_t_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f"CREATE DATABASE {name} TEMPLATE {template}"))
    try:
        yield pg_url(name)
    finally:
        asyncio.run(_pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def redis_url(redis_available: None) -> Iterator[str]:
    """The test Redis database, flushed before and after the test."""
    client = redis.Redis.from_url(REDIS_TEST_URL)
    client.flushdb()
    yield REDIS_TEST_URL
    client.flushdb()
    client.close()


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    """The fake OpenAI-compatible LLM on an ephemeral port."""
    async with FakeLLM() as llm:
        yield llm


@pytest.fixture
def settings(tmp_path: Path, database_url: str, redis_url: str, fake_llm: FakeLLM) -> Settings:
    """Settings pointing at this test's database, Redis db and fake LLM."""
    return base_settings(
        tmp_path, database_url, redis_url=redis_url, llm_base_url=fake_llm.base_url
    )


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[JobService]:
    """The producer side (store + queue), as the API and CLI use it."""
    engine = create_engine(settings)
    queue = await QueueClient.connect(settings)
    try:
        yield JobService(settings, JobStore(create_sessionmaker(engine)), queue)
    finally:
        await queue.close()
        await engine.dispose()


WorkerFactory = Callable[..., Awaitable[Any]]


@pytest.fixture
async def start_worker(settings: Settings) -> AsyncIterator[WorkerFactory]:
    """Start in-process arq workers (as background tasks); all are stopped after the test."""
    from worker.app import create_worker

    running: list[tuple[Any, asyncio.Task[None]]] = []

    async def start(**overrides: Any) -> Any:
        worker = create_worker(settings.with_overrides(**overrides), handle_signals=False)
        task = asyncio.create_task(worker.async_run())
        running.append((worker, task))
        async with asyncio.timeout(10):  # surface a failed start-up now, not as a test timeout
            while "store" not in worker.ctx:
                if task.done():
                    task.result()
                    raise RuntimeError("worker exited during start-up")
                await asyncio.sleep(0.01)
        return worker

    yield start
    for worker, task in running:
        await worker.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], *, timeout_s: float = 15.0, interval_s: float = 0.02
) -> None:
    """Wait until `predicate()` is true; fail the test after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while not await predicate():  # noqa: ASYNC110 - polling another process's state
            await asyncio.sleep(interval_s)


async def wait_terminal(store: JobStore, job_ids: list[str], timeout_s: float = 20.0) -> None:
    """Wait until every job is succeeded, failed or cancelled."""

    async def done() -> bool:
        for job_id in job_ids:
            job = await store.get_job(job_id)
            if job is None or JobStatus(job.status) not in TERMINAL_STATUSES:
                return False
        return True

    await wait_for(done, timeout_s=timeout_s)
