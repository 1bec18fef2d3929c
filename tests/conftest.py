"""Shared fixtures: real Redis, real SQLite and PostgreSQL, the fake LLM, and in-process workers.

Each test gets its own database (SQLite file copied from a migrated template, or a PostgreSQL
database cloned with CREATE DATABASE ... TEMPLATE) and a flushed Redis database.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from promptq import migrate
from promptq.db import create_engine, create_sessionmaker
from promptq.keys import KeyStore
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
#: Filled in by pytest_configure: the Redis db and PostgreSQL template this run owns. Test
#: runs of several checkouts on one machine at once must not share them (each test flushes its
#: Redis db), so a run claims a free slot in Redis (db 0) and releases it when it ends.
REDIS_TEST_DB = 0
REDIS_TEST_URL = ""
PG_TEMPLATE = ""
_SLOT_KEY = "promptq:test-slot:{}"
#: A claim outlives any sane test run, and vanishes by itself if the run is killed.
_SLOT_TTL_S = 3 * 3600


def pytest_configure(config: pytest.Config) -> None:
    """Claim a Redis db (1-15) for this test run."""
    global REDIS_TEST_DB, REDIS_TEST_URL, PG_TEMPLATE
    services.ensure_redis()
    admin = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    forced = os.environ.get("PROMPTQ_TEST_REDIS_DB")
    candidates = [int(forced)] if forced else list(range(15, 0, -1))
    for slot in candidates:
        if forced or admin.set(_SLOT_KEY.format(slot), os.getpid(), nx=True, ex=_SLOT_TTL_S):
            REDIS_TEST_DB = slot
            break
    else:
        raise pytest.UsageError("all 15 Redis test slots are taken by other test runs")
    admin.close()
    REDIS_TEST_URL = f"redis://127.0.0.1:6379/{REDIS_TEST_DB}"
    PG_TEMPLATE = f"promptq_test_template_{REDIS_TEST_DB}_{os.getpid()}"


def pytest_unconfigure(config: pytest.Config) -> None:
    """Release this run's Redis slot."""
    if REDIS_TEST_URL and not os.environ.get("PROMPTQ_TEST_REDIS_DB"):
        admin = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        if admin.get(_SLOT_KEY.format(REDIS_TEST_DB)) == str(os.getpid()).encode():
            admin.delete(_SLOT_KEY.format(REDIS_TEST_DB))
        admin.close()


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


@contextmanager
def scratch_pg_database(prefix: str, *, template: str | None = None) -> Iterator[str]:
    """A new PostgreSQL database (a clone of `template`, or empty) for one test, dropped after;
    yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    clone = f" TEMPLATE {template}" if template else ""
    asyncio.run(_pg_admin(f"CREATE DATABASE {name}{clone}"))
    try:
        yield pg_url(name)
    finally:
        asyncio.run(_pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


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


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put the root logger back as it was: a command run in-process (CliRunner) configures
    logging onto its own stderr, which is closed when it returns."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


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
def pg_template() -> Iterator[str]:
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
    yield PG_TEMPLATE
    asyncio.run(_pg_admin(f"DROP DATABASE IF EXISTS {PG_TEMPLATE} WITH (FORCE)"))


@pytest.fixture(params=DB_BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database for one test: SQLite or PostgreSQL."""
    if request.param == "sqlite":
        path = tmp_path / "promptq.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    with scratch_pg_database("promptq_t", template=request.getfixturevalue("pg_template")) as url:
        yield url


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


@asynccontextmanager
async def open_service(settings: Settings) -> AsyncIterator[JobService]:
    """The producer side (store + queue) on `settings`, closed after."""
    engine = create_engine(settings)
    queue = await QueueClient.connect(settings)
    try:
        yield JobService(settings, JobStore(create_sessionmaker(engine)), queue)
    finally:
        await queue.close()
        await engine.dispose()


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[JobService]:
    """The producer side (store + queue), as the API and CLI use it."""
    async with open_service(settings) as opened:
        yield opened


KeyFactory = Callable[..., Awaitable[str]]


@pytest.fixture
async def make_key(settings: Settings) -> AsyncIterator[KeyFactory]:
    """Create API keys in this test's database: `await make_key("name", admin=True)` -> key."""
    engine = create_engine(settings)
    keys = KeyStore(create_sessionmaker(engine))

    async def make(name: str, *, admin: bool = False) -> str:
        return (await keys.create(name, admin=admin))[1]

    yield make
    await engine.dispose()


def bearer(key: str) -> dict[str, str]:
    """The Authorization header for an API key."""
    return {"Authorization": f"Bearer {key}"}


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
        await stop_worker(worker)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def stop_worker(worker: Any) -> None:
    """arq's Worker.close(), made safe against a job task it cancels ending as cancelled.

    close() cancels the running job tasks, then gathers them: a task that ends cancelled
    re-raises CancelledError out of close(), skipping the rest of its clean-up (Redis pool,
    on_shutdown). That is the job's cancellation, not ours, so finish the clean-up here.
    """
    try:
        await worker.close()
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # this fixture itself is being cancelled
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        worker.tasks.clear()
        await worker.close()


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], *, timeout_s: float = 15.0, interval_s: float = 0.02
) -> None:
    """Wait until `predicate()` is true; fail the test after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        # Polling on purpose: the condition lives in a database or another process.
        while not await predicate():
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


ApiClient = TestClient[web.Request, web.Application]
ApiStarter = Callable[..., Awaitable[ApiClient]]


@pytest.fixture
async def start_api(settings: Settings) -> AsyncIterator[ApiStarter]:
    """Start the real API app on an ephemeral port: `await start_api(headers, **overrides)`."""
    from api.app import create_app

    clients: list[ApiClient] = []

    async def start(headers: dict[str, str] | None = None, **overrides: Any) -> ApiClient:
        app_settings = settings.with_overrides(**overrides) if overrides else settings
        client: ApiClient = TestClient(TestServer(create_app(app_settings)), headers=headers)
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


SdkFactory = Callable[..., openai.AsyncOpenAI]


@pytest.fixture
async def sdk(api: ApiClient) -> AsyncIterator[SdkFactory]:
    """AsyncOpenAI clients for promptq's /v1 (the test module's `api`, or `server`), closed
    after the test: `sdk(key)`, `sdk(key, server)`."""
    made: list[openai.AsyncOpenAI] = []

    def make(key: str, server: ApiClient | None = None) -> openai.AsyncOpenAI:
        url = str((server or api).make_url("/v1"))
        client = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


@pytest.fixture
def client(sdk: SdkFactory, key: str) -> openai.AsyncOpenAI:
    """An AsyncOpenAI client with the test module's `key`."""
    return sdk(key)
