"""Chaos fixtures: a private redis-server to kill and restart, `promptq worker` subprocesses.

Chaos tests never touch the shared Redis: each gets its own server on a free port (no
persistence, so a restart loses everything, like a crash without AOF).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import select

from promptq.models import TERMINAL_STATUSES, AttemptOutcome, Job, JobAttempt
from promptq.service import JobService
from promptq.settings import Settings
from tests.conftest import open_service, wait_for
from tests.e2e.conftest import Procs, free_port
from tests.services import port_open, wait_port


@dataclass
class RedisServer:
    """A redis-server process of our own."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        """Its URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it (empty) and wait until it answers."""
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if not wait_port("127.0.0.1", self.port, 10):
            raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL it and wait until the port is closed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None
        assert not port_open("127.0.0.1", self.port)

    def stop(self) -> None:
        """Stop it if it runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server on a free port, stopped after the test."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(free_port(), workdir)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def chaos_settings(settings: Settings, private_redis: RedisServer) -> Settings:
    """This test's settings on the private Redis; lease and reconcile interval as shipped."""
    return settings.with_overrides(redis_url=private_redis.url)


@pytest.fixture
async def chaos_service(chaos_settings: Settings) -> AsyncIterator[JobService]:
    """The producer side on the private Redis."""
    async with open_service(chaos_settings) as service:
        yield service


@pytest.fixture
def chaos_procs(chaos_settings: Settings, tmp_path: Path) -> Iterator[Procs]:
    """`promptq` subprocesses on the private Redis; stopped (and logs kept) after the test."""
    procs = Procs(chaos_settings, tmp_path)
    yield procs
    procs.stop_all()


def worker_name(proc: subprocess.Popen[bytes]) -> str:
    """The name a `promptq worker` subprocess records on its attempts."""
    return f"{socket.gethostname()}:{proc.pid}"


async def running_attempts(service: JobService, worker: str) -> int:
    """How many attempts `worker` has open right now."""
    query = select(JobAttempt.id).where(
        JobAttempt.worker == worker, JobAttempt.outcome == AttemptOutcome.RUNNING
    )
    async with service.store._sessionmaker() as session:
        return len((await session.execute(query)).all())


async def all_attempts(service: JobService) -> list[JobAttempt]:
    """Every attempt row."""
    async with service.store._sessionmaker() as session:
        return list((await session.execute(select(JobAttempt))).scalars())


async def all_jobs(service: JobService) -> dict[str, Job]:
    """Every job row, by id (one query, for batches too big to read one by one)."""
    async with service.store._sessionmaker() as session:
        return {job.id: job for job in (await session.execute(select(Job))).scalars()}


async def wait_all_terminal(service: JobService, *, timeout_s: float) -> None:
    """Wait until no job of this test's database is waiting or running (one query a poll)."""

    async def done() -> bool:
        query = select(Job.id).where(Job.status.not_in(list(TERMINAL_STATUSES))).limit(1)
        async with service.store._sessionmaker() as session:
            return (await session.execute(query)).first() is None

    await wait_for(done, timeout_s=timeout_s, interval_s=0.2)
