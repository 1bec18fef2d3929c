"""Throughput benchmark: how close promptq keeps a model to saturation, on this machine.

Run `python -m bench --quick` (about 5 minutes) or `python -m bench` (the full run, about 14
minutes on a quiet 2-core machine).
It needs the `bench` extra (matplotlib, psutil), Redis, and PostgreSQL for the PostgreSQL rows.

Every system calls the same fake OpenAI-compatible LLM over real HTTP: `promptq fake-llm`, in a
process of its own with microsecond timers (bench.fake_process), so that its answers come when
their injected latency is up and it shares no event loop with the systems under test:

* baseline: `asyncio.gather` under a semaphore, calling the fake over aiohttp (least overhead);
* arq: plain arq on its defaults (poll_delay 0.5 s) with `max_jobs` = the concurrency, running a
  trivial job that calls the fake (`bench.plain_arq`, in a subprocess);
* promptq-sqlite / promptq-postgres: jobs submitted over HTTP to a real `promptq api`
  subprocess (SQL row, then Redis), run by a real `promptq worker` subprocess that records
  every result in SQL.

The shared-limit workload runs promptq with three worker processes of 8 model slots each,
sharing one endpoint limited to 12 calls in flight (`max_in_flight`, a global limit in Redis):
the question is how busy they keep a model whose capacity is the limit, not their slots. Its
ideal and efficiency count against the limit (the baseline runs 12 at a time in one process);
plain arq has no global limits and sits it out.

For the queues, the worker is started and then frozen (SIGSTOP) while the whole workload is
submitted, then thawed: the makespan runs from the thaw to the last job's finish, so it measures
draining a full queue, and the worker's CPU time excludes its start-up and the submission. CPU
per job end to end is the worker's CPU during the drain plus the API's during the submission
(psutil). Efficiency is ideal / makespan, where ideal = the latency the fake injected /
concurrency; SAQ's short runs are repeated 3 times per system (not plain arq) and the median run
is reported. A slot hand-off is how long a model slot freed by a finished call stays empty until
the next call arrives (handoff_gaps_ms). The fake records its peak of requests in flight; a run
that exceeds the configured concurrency fails. Pickup latency (enqueue to attempt start: the
bench's queue client records when it hands each job to Redis, the attempt row when the worker
started it) is measured on an idle worker, one job at a time. Results go to
bench/results/throughput.json and .png. Numbers are for this machine only (a 2-core VM shared
with other work: see load_avg_1m in the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import psutil
import redis.asyncio
from arq.connections import ArqRedis, RedisSettings, create_pool
from sqlalchemy import func, select

from bench.fake_process import FakeLLMProcess
from bench.plain_arq import CALL_LLM, MODEL
from promptq import migrate
from promptq.db import create_engine, create_sessionmaker
from promptq.models import Job, JobAttempt, JobStatus
from promptq.queue import QueueClient
from promptq.schemas import PromptJobCreate
from promptq.service import JobService
from promptq.settings import Settings
from promptq.store import JobStore

REPO_DIR = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_DIR / "bench" / "results"
PROMPTQ = str(Path(sys.executable).with_name("promptq"))
SYSTEMS = ("baseline", "arq", "promptq-sqlite", "promptq-postgres")
#: The fake's RNG seed, so that every system gets the same latencies.
SEED = 1
#: Submissions in flight at once while a queue is being filled.
SUBMIT_CONCURRENCY = 16
#: How often the benchmark looks for "all done" (it times from SQL/arq timestamps, not this).
DONE_POLL_S = 0.05
#: How often the worker's RSS is sampled.
RSS_SAMPLE_S = 0.2
#: Idle pause before each pickup sample: at least 20 ms, so that the worker is waiting, not
#: finishing a job; random over a whole 0.5 s poll period, so that a polling worker's samples
#: are not phase-locked to its polls.
PICKUP_IDLE_S = (0.02, 0.52)
TARGETS = {
    "saq_efficiency": 0.97,
    "llm_postgres_efficiency": 0.98,
    "pickup_p50_ms": 5.0,
    "pickup_p99_ms": 25.0,
    "worker_cpu_ms_per_job": 1.0,
}


@dataclass(frozen=True)
class Workload:
    """A number of jobs run at a concurrency against a fake of a given latency."""

    name: str
    label: str
    jobs: int
    concurrency: int
    latency_ms: float
    jitter: float
    #: Runs per system (plain arq: one); the report keeps the median one (see median_run).
    repeats: int = 1
    #: How promptq gets the jobs: "jobs" (one POST /api/jobs each) or "batch" (one JSONL
    #: POST /api/batches, the way to submit thousands of jobs).
    submit: str = "jobs"
    #: promptq worker processes, each with this many model slots (None: `concurrency`). With
    #: more slots than `concurrency` in all, the concurrency is a global limit they share
    #: (the endpoint's `max_in_flight`), and plain arq, which has none, sits the workload out.
    workers: int = 1
    worker_concurrency: int | None = None

    @property
    def shared_limit(self) -> bool:
        """True if promptq's workers share `concurrency` as a global limit."""
        return self.workers * (self.worker_concurrency or self.concurrency) > self.concurrency


@dataclass
class Run:
    """One system on one workload."""

    system: str
    workload: str
    jobs: int
    concurrency: int
    makespan_s: float
    ideal_s: float
    #: The machine's 1-minute load average when the run ended (other work skews the numbers).
    load_avg_1m: float
    efficiency: float | None
    jobs_per_s: float
    llm_requests: int
    peak_in_flight: int
    #: Time the fake's slots were busy (requests in flight, summed) / (concurrency x makespan):
    #: efficiency is this divided by how much the fake's own answers ran late.
    model_busy: float | None = None
    #: A freed model slot's wait for the next call, p50 and p99 (bench.throughput.handoff_gaps_ms).
    handoff_p50_ms: float | None = None
    handoff_p99_ms: float | None = None
    worker_cpu_ms_per_job: float | None = None
    worker_rss_mib: float | None = None
    #: promptq only: CPU of the API process while it took the submissions.
    api_cpu_ms_per_job: float | None = None
    #: Every run's efficiency when the workload ran more than once (this Run is the median).
    efficiencies: list[float] | None = None
    #: Baseline only: CPU of this whole process (client and fake server together).
    process_cpu_ms_per_job: float | None = None

    @property
    def cpu_ms_per_job(self) -> float | None:
        """End to end: worker + API for promptq, the worker for arq, the process for the
        baseline (which includes the fake server's share)."""
        if self.process_cpu_ms_per_job is not None:
            return self.process_cpu_ms_per_job
        if self.worker_cpu_ms_per_job is None:
            return None
        return self.worker_cpu_ms_per_job + (self.api_cpu_ms_per_job or 0.0)


@dataclass
class Pickup:
    """Enqueue-to-start latency on an idle worker, one job at a time."""

    system: str
    samples: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    #: promptq: the same jobs timed from the job row's created_at (before INSERT and enqueue).
    submit_p50_ms: float | None = None
    submit_p99_ms: float | None = None


def workloads(scale: float) -> list[Workload]:
    """The workloads; `scale` shrinks the LLM-like, zero-latency and shared-limit job counts."""
    llm_jobs, zero_jobs = max(100, round(10_000 * scale)), max(100, round(5_000 * scale))
    limit_jobs = max(300, round(1_500 * scale))
    return [
        Workload("saq", "SAQ: 1,000 jobs, c=10, 0-50 ms", 1_000, 10, 25.0, 1.0, repeats=3),
        Workload("llm", f"LLM-like: {llm_jobs:,} jobs, c=100, 1 s ±30%", llm_jobs, 100, 1000, 0.3),
        Workload(
            "zero",
            f"zero latency: {zero_jobs:,} jobs, c=10, one batch",
            zero_jobs,
            10,
            0.0,
            0.0,
            submit="batch",
        ),
        Workload(
            "limit",
            f"shared limit: {limit_jobs:,} jobs, max_in_flight=12 over 3 workers x 8, 100 ms ±30%",
            limit_jobs,
            12,
            100.0,
            0.3,
            workers=3,
            worker_concurrency=8,
        ),
    ]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest-rank."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def content(workload: str, i: int) -> str:
    """A unique prompt per job."""
    return f"bench {workload} job {i}"


async def make_run(
    system: str, w: Workload, makespan_s: float, fake: FakeLLMProcess, **extra: Any
) -> Run:
    """A Run with the derived numbers filled in from the fake's counters.

    Raises if the fake saw more requests in flight at once than the configured concurrency.
    """
    stats = await fake.stats()
    if stats["peak_in_flight"] > w.concurrency:
        raise RuntimeError(
            f"{system} {w.name}: {stats['peak_in_flight']} requests in flight at once, "
            f"over the configured concurrency of {w.concurrency}"
        )
    ideal_s = stats["latency_ms_total"] / 1000 / w.concurrency
    gaps_ms = handoff_gaps_ms(stats["spans"], w.concurrency)
    return Run(
        system=system,
        workload=w.name,
        jobs=w.jobs,
        concurrency=w.concurrency,
        makespan_s=makespan_s,
        ideal_s=ideal_s,
        load_avg_1m=os.getloadavg()[0],
        efficiency=ideal_s / makespan_s if ideal_s > 0 else None,
        jobs_per_s=w.jobs / makespan_s,
        llm_requests=stats["total_requests"],
        peak_in_flight=stats["peak_in_flight"],
        model_busy=stats["busy_ms_total"] / 1000 / (w.concurrency * makespan_s),
        handoff_p50_ms=percentile(gaps_ms, 50) if gaps_ms else None,
        handoff_p99_ms=percentile(gaps_ms, 99) if gaps_ms else None,
        **extra,
    )


def handoff_gaps_ms(spans: list[list[float]], concurrency: int) -> list[float]:
    """How long each freed model slot stayed empty, as the fake saw it: from the k-th call to
    end until the (k + concurrency)-th call to start (the one that took its place, with the
    model kept at its concurrency)."""
    ends = sorted(end for _, end in spans)
    starts = sorted(start for start, _ in spans)
    return [(starts[k + concurrency] - ends[k]) * 1000 for k in range(len(ends) - concurrency)]


def median_run(tries: list[Run]) -> Run:
    """The run of median makespan, noting every run's efficiency. A SAQ run drains in about
    3 s, and on a shared 2-core machine such short runs vary by a few percent."""
    chosen = sorted(tries, key=lambda r: r.makespan_s)[(len(tries) - 1) // 2]
    if len(tries) > 1:
        chosen.efficiencies = [r.efficiency for r in tries if r.efficiency is not None]
    return chosen


async def prepare_fake(fake: FakeLLMProcess, w: Workload) -> None:
    """Set the fake's latency for `w` and clear its counters (reseeding its RNG)."""
    await fake.prepare(latency_ms=w.latency_ms, jitter=w.jitter, seed=SEED)


async def wait_until(
    done: Callable[[], Awaitable[bool]], timeout_s: float, what: str, proc: WorkerProcess | None
) -> None:
    """Poll `done` until true; raise if it takes longer than `timeout_s` or the worker died."""
    deadline = time.monotonic() + timeout_s
    while not await done():
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{what}: the worker exited; see {proc.log_path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout_s:.0f} s")
        await asyncio.sleep(DONE_POLL_S)


def run_timeout_s(w: Workload) -> float:
    """A generous limit for one run: plain arq at its worst, plus start-up."""
    return 300 + 2 * w.jobs * (w.latency_ms / 1000 + 0.6) / w.concurrency


# -- the worker subprocess -----------------------------------------------------------------------


class WorkerProcess:
    """A worker subprocess that can be frozen, thawed, measured (CPU, RSS) and stopped."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT
            )
        self.process = psutil.Process(self.popen.pid)
        self.peak_rss_bytes = 0
        self._sampler: asyncio.Task[None] | None = None

    def cpu_s(self) -> float:
        """User + system CPU seconds used so far."""
        times = self.process.cpu_times()
        return float(times.user + times.system)

    async def wait_ready(self, redis_client: redis.asyncio.Redis, health_key: str) -> None:
        """Wait for the first poll (it writes arq's health-check key), then let it settle."""

        async def ready() -> bool:
            return bool(await redis_client.exists(health_key))

        await wait_until(ready, 60, "worker start-up", self)
        await asyncio.sleep(1.0)  # the startup reconciler pass and the like

    def freeze(self) -> float:
        """SIGSTOP; returns the CPU seconds used until then."""
        cpu = self.cpu_s()
        os.kill(self.popen.pid, signal.SIGSTOP)
        return cpu

    def thaw(self) -> float:
        """SIGCONT and start sampling RSS; returns the wall time of the thaw."""
        thawed_at = time.time()
        os.kill(self.popen.pid, signal.SIGCONT)
        self._sampler = asyncio.create_task(self._sample_rss())
        return thawed_at

    async def _sample_rss(self) -> None:
        while True:
            self.peak_rss_bytes = max(self.peak_rss_bytes, self.process.memory_info().rss)
            await asyncio.sleep(RSS_SAMPLE_S)

    async def stop(self) -> None:
        """Thaw if needed, SIGTERM, and wait (SIGKILL after 15 s)."""
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGCONT)
            self.popen.terminate()
            try:
                await asyncio.to_thread(self.popen.wait, 15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                await asyncio.to_thread(self.popen.wait)


# -- (a) baseline --------------------------------------------------------------------------------


async def run_baseline(w: Workload, fake: FakeLLMProcess) -> Run:
    """gather + semaphore over aiohttp, in this process."""
    await prepare_fake(fake, w)
    url = fake.base_url + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    slots = asyncio.Semaphore(w.concurrency)
    connector = aiohttp.TCPConnector(limit=w.concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(i: int) -> None:
            body = orjson.dumps(
                {"model": MODEL, "messages": [{"role": "user", "content": content(w.name, i)}]}
            )
            async with slots, http.post(url, data=body, headers=headers) as response:
                response.raise_for_status()
                await response.read()

        cpu0, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(w.jobs)))
        makespan_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu0
    cpu_ms_per_job = cpu_s * 1000 / w.jobs
    return await make_run("baseline", w, makespan_s, fake, process_cpu_ms_per_job=cpu_ms_per_job)


# -- (b) plain arq -------------------------------------------------------------------------------


class PlainArq:
    """Plain arq on its defaults: a worker subprocess and a pool to enqueue with."""

    QUEUE = "arq:bench"

    def __init__(self, redis_url: str, tmp: Path) -> None:
        self.redis_url, self.tmp = redis_url, tmp

    async def run(
        self, w: Workload, fake: FakeLLMProcess, pickup_samples: int
    ) -> tuple[Run, Pickup | None]:
        """Fill the queue under a frozen worker, thaw it, and time the drain."""
        pool = await create_pool(RedisSettings.from_dsn(self.redis_url))
        await pool.flushdb()
        proc = WorkerProcess(
            [
                sys.executable,
                "-m",
                "bench.plain_arq",
                "--redis-url",
                self.redis_url,
                "--queue",
                self.QUEUE,
                "--llm-url",
                fake.base_url + "/chat/completions",
                "--concurrency",
                str(w.concurrency),
            ],
            env=dict(os.environ),
            cwd=REPO_DIR,
            log_path=self.tmp / f"arq-{w.name}.log",
        )
        try:
            await proc.wait_ready(pool, self.QUEUE + ":health-check")
            cpu0 = proc.freeze()
            await prepare_fake(fake, w)
            await self._enqueue(pool, [content(w.name, i) for i in range(w.jobs)])
            thawed_at = proc.thaw()

            async def drained() -> bool:
                return bool(await pool.zcard(self.QUEUE) == 0)

            await wait_until(drained, run_timeout_s(w), f"arq {w.name}", proc)
            cpu_s = proc.cpu_s() - cpu0
            results = await pool.all_job_results()
            failed = [r for r in results if not r.success]
            if len(results) != w.jobs or failed:
                example = repr(failed[0].result) if failed else "-"
                raise RuntimeError(
                    f"arq {w.name}: {len(results)} results for {w.jobs} jobs, "
                    f"{len(failed)} failed, e.g. {example}"
                )
            makespan_s = max(r.finish_time.timestamp() for r in results) - thawed_at
            run = await make_run(
                "arq",
                w,
                makespan_s,
                fake,
                worker_cpu_ms_per_job=cpu_s * 1000 / w.jobs,
                worker_rss_mib=proc.peak_rss_bytes / 2**20,
            )
            pickup = await self._pickup(pool, fake, pickup_samples) if pickup_samples else None
            return run, pickup
        finally:
            await proc.stop()
            await pool.aclose()

    async def _enqueue(self, pool: ArqRedis, contents: list[str]) -> list[str]:
        slots = asyncio.Semaphore(SUBMIT_CONCURRENCY)

        async def one(text: str) -> str:
            async with slots:
                job = await pool.enqueue_job(CALL_LLM, text, _queue_name=self.QUEUE)
                assert job is not None
                return job.job_id

        return list(await asyncio.gather(*(one(c) for c in contents)))

    async def _pickup(self, pool: ArqRedis, fake: FakeLLMProcess, samples: int) -> Pickup:
        await fake.prepare(latency_ms=0.0)
        ids = []
        for i in range(samples):
            await asyncio.sleep(random.uniform(*PICKUP_IDLE_S))
            ids += await self._enqueue(pool, [content("pickup", i)])
            await fake.wait_for_requests(i + 1, timeout_s=10)

        async def drained() -> bool:
            return bool(await pool.zcard(self.QUEUE) == 0)

        await wait_until(drained, 30, "arq pickup", None)
        results = [r for r in await pool.all_job_results() if r.job_id in set(ids)]
        return pickup_stats(
            "arq", [(r.start_time - r.enqueue_time).total_seconds() * 1000 for r in results]
        )


def pickup_stats(
    system: str, latencies_ms: list[float], from_submit_ms: list[float] | None = None
) -> Pickup:
    """Summarise pickup samples (and, for promptq, the same jobs timed from their INSERT)."""
    return Pickup(
        system=system,
        samples=len(latencies_ms),
        p50_ms=percentile(latencies_ms, 50),
        p99_ms=percentile(latencies_ms, 99),
        mean_ms=statistics.fmean(latencies_ms),
        max_ms=max(latencies_ms),
        submit_p50_ms=percentile(from_submit_ms, 50) if from_submit_ms else None,
        submit_p99_ms=percentile(from_submit_ms, 99) if from_submit_ms else None,
    )


class TimedQueue(QueueClient):
    """The bench's hook on the queue client: when each job was handed to Redis, which is
    where pickup latency starts (the job row's created_at is earlier, before the INSERT)."""

    def __init__(self, redis: ArqRedis, queue_name: str) -> None:
        super().__init__(redis, queue_name)
        self.enqueued_at: dict[str, float] = {}

    async def enqueue(self, job_id: str, *, defer_s: float = 0.0, priority: int = 0) -> bool:
        """Record the time, then enqueue."""
        self.enqueued_at[job_id] = time.time()
        return await super().enqueue(job_id, defer_s=defer_s, priority=priority)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_http_ok(url: str, proc: WorkerProcess) -> None:
    """Wait until GET `url` answers 200 (the API is up and sees Redis and the database)."""

    async def up() -> bool:
        try:
            async with aiohttp.ClientSession() as http, http.get(url) as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    await wait_until(up, 60, f"{url} start-up", proc)


async def submit_http(api_url: str, contents: list[str]) -> list[str]:
    """POST one prompt job per content to the API, SUBMIT_CONCURRENCY at a time."""
    url = api_url + "/api/jobs"
    headers = {"Content-Type": "application/json"}
    slots = asyncio.Semaphore(SUBMIT_CONCURRENCY)
    connector = aiohttp.TCPConnector(limit=SUBMIT_CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(text: str) -> str:
            body = orjson.dumps({"kind": "prompt", "messages": [{"role": "user", "content": text}]})
            async with slots, http.post(url, data=body, headers=headers) as response:
                if response.status != 202:
                    raise RuntimeError(f"POST /api/jobs: {response.status} {await response.text()}")
                job_id: str = orjson.loads(await response.read())["id"]
                return job_id

        return list(await asyncio.gather(*(one(c) for c in contents)))


async def submit_batch_http(api_url: str, contents: list[str]) -> None:
    """POST all the prompt jobs to the API as one JSONL batch."""
    body = b"".join(
        orjson.dumps({"kind": "prompt", "messages": [{"role": "user", "content": text}]}) + b"\n"
        for text in contents
    )
    headers = {"Content-Type": "application/x-ndjson"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(api_url + "/api/batches", data=body, headers=headers) as response,
    ):
        if response.status != 201:
            raise RuntimeError(f"POST /api/batches: {response.status} {await response.text()}")


# -- (c) promptq ---------------------------------------------------------------------------------


class PromptQ:
    """promptq end to end on one database backend: JobService in here, `promptq worker` there."""

    QUEUE = "promptq:bench"

    def __init__(
        self, backend: str, redis_url: str, pg_dsn: str, tmp: Path, prefetch: int | None = None
    ) -> None:
        self.backend, self.redis_url, self.pg_dsn, self.tmp = backend, redis_url, pg_dsn, tmp
        self.prefetch = prefetch
        self.system = f"promptq-{backend}"

    @contextlib.asynccontextmanager
    async def _database(self, name: str) -> Any:
        """A fresh, migrated database; yields its SQLAlchemy URL and drops it afterwards."""
        if self.backend == "sqlite":
            path = self.tmp / f"{name}-{uuid.uuid4().hex[:10]}.db"
            try:
                yield f"sqlite+aiosqlite:///{path}"
            finally:
                for leftover in self.tmp.glob(f"{path.name}*"):  # with its -wal and -shm
                    leftover.unlink()
            return
        db = f"promptq_bench_{uuid.uuid4().hex[:10]}"
        conn = await asyncpg.connect(self.pg_dsn)
        try:
            await conn.execute(f"CREATE DATABASE {db}")
        finally:
            await conn.close()
        try:
            base = self.pg_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
            yield f"{base}/{db}"
        finally:
            conn = await asyncpg.connect(self.pg_dsn)
            try:
                await conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            finally:
                await conn.close()

    def _settings(self, database_url: str, fake: FakeLLMProcess, w: Workload) -> Settings:
        endpoints = ""
        if w.shared_limit:  # every model on the fake, at most `concurrency` calls at once
            endpoints = orjson.dumps(
                [
                    {
                        "name": "fake",
                        "models": ["*"],
                        "base_url": fake.base_url,
                        "limits": {"max_in_flight": w.concurrency},
                    }
                ]
            ).decode()
        return Settings(
            _env_file=None,
            data_dir=self.tmp,
            database_url=database_url,
            redis_url=self.redis_url,
            queue_name=self.QUEUE,
            llm_base_url=fake.base_url,
            default_model=MODEL,
            worker_concurrency=w.worker_concurrency or w.concurrency,
            worker_prefetch=self.prefetch,
            endpoints=endpoints,
        )

    @staticmethod
    def _env(settings: Settings) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")}
        for name in ("data_dir", "database_url", "redis_url", "queue_name", "llm_base_url"):
            env[f"PROMPTQ_{name.upper()}"] = str(getattr(settings, name))
        env["PROMPTQ_DEFAULT_MODEL"] = settings.default_model
        if settings.worker_prefetch is not None:
            env["PROMPTQ_WORKER_PREFETCH"] = str(settings.worker_prefetch)
        if settings.endpoints:
            env["PROMPTQ_ENDPOINTS"] = settings.endpoints
        return env

    async def run(
        self, w: Workload, fake: FakeLLMProcess, pickup_samples: int
    ) -> tuple[Run, Pickup | None]:
        """Submit through a `promptq api` process while the worker is frozen, thaw it, and
        time the drain from SQL."""
        async with self._database(f"{self.system}-{w.name}") as database_url:
            settings = self._settings(database_url, fake, w)
            await asyncio.to_thread(migrate.upgrade, settings)
            engine = create_engine(settings)
            plain = await QueueClient.connect(settings)
            queue = TimedQueue(plain.redis, plain.queue_name)
            await queue.redis.flushdb()
            service = JobService(settings, JobStore(create_sessionmaker(engine)), queue)
            port = free_port()
            api = WorkerProcess(
                [PROMPTQ, "api", "--host", "127.0.0.1", "--port", str(port)],
                env={**self._env(settings), "PROMPTQ_AUTH_DISABLED": "true"},
                cwd=self.tmp,
                log_path=self.tmp / f"{self.system}-{w.name}-api.log",
            )
            procs = [
                WorkerProcess(
                    [PROMPTQ, "worker", "--concurrency", str(settings.worker_concurrency)],
                    env=self._env(settings),
                    cwd=self.tmp,
                    log_path=self.tmp / f"{self.system}-{w.name}-{n}.log",
                )
                for n in range(w.workers)
            ]
            proc = procs[0]
            api_url = f"http://127.0.0.1:{port}"
            try:
                for each in procs:
                    await each.wait_ready(queue.redis, self.QUEUE + ":health-check")
                await wait_http_ok(api_url + "/healthz", api)
                cpu0 = sum(each.freeze() for each in procs)
                await prepare_fake(fake, w)
                api_cpu0 = api.cpu_s()
                submit = submit_batch_http if w.submit == "batch" else submit_http
                await submit(api_url, [content(w.name, i) for i in range(w.jobs)])
                api_cpu_s = api.cpu_s() - api_cpu0
                thawed_at = min(each.thaw() for each in procs)
                await wait_until(
                    lambda: self._all_done(service, w.jobs),
                    run_timeout_s(w),
                    f"{self.system} {w.name}",
                    proc,
                )
                cpu_s = sum(each.cpu_s() for each in procs) - cpu0
                last_finish = await self._last_finish(service, w.jobs)
                run = await make_run(
                    self.system,
                    w,
                    last_finish.timestamp() - thawed_at,
                    fake,
                    worker_cpu_ms_per_job=cpu_s * 1000 / w.jobs,
                    worker_rss_mib=max(each.peak_rss_bytes for each in procs) / 2**20,
                    api_cpu_ms_per_job=api_cpu_s * 1000 / w.jobs,
                )
                pickup = None
                if pickup_samples:
                    pickup = await self._pickup(service, queue, fake, pickup_samples)
                return run, pickup
            finally:
                for each in procs:
                    await each.stop()
                await api.stop()
                await queue.close()
                await engine.dispose()

    @staticmethod
    async def _submit(service: JobService, contents: list[str]) -> list[str]:
        slots = asyncio.Semaphore(SUBMIT_CONCURRENCY)

        async def one(text: str) -> str:
            request = PromptJobCreate.model_validate(
                {"kind": "prompt", "messages": [{"role": "user", "content": text}]}
            )
            async with slots:
                job, created = await service.submit(request)
            assert created
            return job.id

        return list(await asyncio.gather(*(one(c) for c in contents)))

    @staticmethod
    async def _count(service: JobService, *where: Any) -> int:
        async with service.store._sessionmaker() as session:
            result = await session.execute(select(func.count(Job.id)).where(*where))
            return int(result.scalar_one())

    async def _all_done(self, service: JobService, jobs: int) -> bool:
        finished = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
        return await self._count(service, Job.status.in_(finished)) >= jobs

    async def _last_finish(self, service: JobService, jobs: int) -> datetime:
        succeeded = await self._count(service, Job.status == JobStatus.SUCCEEDED)
        assert succeeded == jobs, f"only {succeeded} of {jobs} jobs succeeded"
        async with service.store._sessionmaker() as session:
            last: datetime | None = (
                await session.execute(select(func.max(Job.finished_at)))
            ).scalar_one()
        assert last is not None
        return last if last.tzinfo else last.replace(tzinfo=UTC)

    async def _pickup(
        self, service: JobService, queue: TimedQueue, fake: FakeLLMProcess, samples: int
    ) -> Pickup:
        await fake.prepare(latency_ms=0.0)
        ids = []
        for i in range(samples):
            await asyncio.sleep(random.uniform(*PICKUP_IDLE_S))
            ids += await self._submit(service, [content("pickup", i)])
            await fake.wait_for_requests(i + 1, timeout_s=10)

        async def done() -> bool:
            return await self._count(service, Job.id.in_(ids), Job.finished_at.is_not(None)) == len(
                ids
            )

        await wait_until(done, 30, f"{self.system} pickup", None)
        query = (
            select(Job.id, JobAttempt.started_at, Job.created_at)
            .join(Job, Job.id == JobAttempt.job_id)
            .where(Job.id.in_(ids), JobAttempt.number == 1)
        )
        async with service.store._sessionmaker() as session:
            rows = (await session.execute(query)).all()
        return pickup_stats(
            self.system,
            [(started.timestamp() - queue.enqueued_at[id_]) * 1000 for id_, started, _ in rows],
            from_submit_ms=[
                (started - created).total_seconds() * 1000 for _, started, created in rows
            ],
        )


# -- reporting -----------------------------------------------------------------------------------


def by_system(runs: list[Run], workload: str) -> dict[str, Run]:
    """The runs of one workload, by system."""
    return {r.system: r for r in runs if r.workload == workload}


def fmt(value: float | None, spec: str) -> str:
    """Format a number, or '-' for none."""
    return "-" if value is None else format(value, spec)


def efficiency(r: Run) -> str:
    """The efficiency, with the range over repeated runs."""
    text = fmt(r.efficiency, ".3f")
    if r.efficiencies:
        text += f" ({min(r.efficiencies):.3f}-{max(r.efficiencies):.3f})"
    return text


def summary_table(ws: list[Workload], runs: list[Run], pickups: list[Pickup]) -> str:
    """A Markdown table of every run, then one of pickup latencies."""
    lines = [
        "| workload | system | makespan s | ideal s | efficiency | model busy "
        "| slot hand-off p50 / p99 ms | jobs/s | c/a "
        "| c/b | CPU ms/job (worker + API) | worker RSS MiB | peak in flight |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in ws:
        group = by_system(runs, w.name)
        for system in SYSTEMS:
            if (r := group.get(system)) is None:
                continue
            base, arq = group.get("baseline"), group.get("arq")
            vs_a = r.jobs_per_s / base.jobs_per_s if base and system.startswith("promptq") else None
            vs_b = r.jobs_per_s / arq.jobs_per_s if arq and system.startswith("promptq") else None
            cpu = fmt(r.cpu_ms_per_job, ".2f")
            if r.api_cpu_ms_per_job is not None:
                cpu += f" ({fmt(r.worker_cpu_ms_per_job, '.2f')} + {r.api_cpu_ms_per_job:.2f})"
            lines.append(
                f"| {w.label} | {system} | {r.makespan_s:.2f} | {r.ideal_s:.2f} "
                f"| {efficiency(r)} | {fmt(r.model_busy, '.3f')} "
                f"| {fmt(r.handoff_p50_ms, '.2f')} / {fmt(r.handoff_p99_ms, '.2f')} "
                f"| {r.jobs_per_s:,.0f} "
                f"| {fmt(vs_a, '.2f')} "
                f"| {fmt(vs_b, '.2f')} | {cpu} | {fmt(r.worker_rss_mib, '.0f')} "
                f"| {r.peak_in_flight} / {r.concurrency} |"
            )
    lines += [
        "",
        "| pickup, enqueue to start (idle worker, one job at a time) | samples | p50 ms "
        "| p99 ms | mean ms | max ms | from the INSERT: p50 / p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {p.system} | {p.samples} | {p.p50_ms:.1f} | {p.p99_ms:.1f} | {p.mean_ms:.1f} "
        f"| {p.max_ms:.1f} | {fmt(p.submit_p50_ms, '.1f')} / {fmt(p.submit_p99_ms, '.1f')} |"
        for p in pickups
    ]
    return "\n".join(lines)


def chart(path: Path, ws: list[Workload], runs: list[Run], pickups: list[Pickup]) -> None:
    """Efficiency, zero-latency throughput and pickup latency, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (eff_ax, zero_ax, pick_ax) = plt.subplots(1, 3, figsize=(16, 5))
    colors = dict(zip(SYSTEMS, ("#999999", "#d62728", "#1f77b4", "#2ca02c"), strict=True))
    timed = [w for w in ws if w.latency_ms > 0]
    width = 0.8 / len(SYSTEMS)
    for i, system in enumerate(SYSTEMS):
        values = [getattr(by_system(runs, w.name).get(system), "efficiency", None) for w in timed]
        xs = [j + i * width for j, v in enumerate(values) if v is not None]
        heights = [v for v in values if v is not None]
        eff_ax.bar(xs, heights, width, label=system, color=colors[system])
    eff_ax.set_xticks([j + 0.4 - width / 2 for j in range(len(timed))], [w.label for w in timed])
    eff_ax.set_ylabel("efficiency (ideal / makespan)")
    eff_ax.set_ylim(0, 1.3)
    eff_ax.axhline(1.0, color="black", linewidth=0.5)
    eff_ax.legend(loc="upper center", ncol=2, fontsize=8)
    eff_ax.tick_params(axis="x", labelsize=7)
    for w in ws:
        if w.latency_ms == 0:
            group = by_system(runs, w.name)
            names = [s for s in SYSTEMS if s in group]
            speeds = [group[s].jobs_per_s for s in names]
            zero_ax.bar(names, speeds, color=[colors[s] for s in names])
            zero_ax.set_title(w.label, fontsize=9)
    zero_ax.set_ylabel("jobs/s")
    zero_ax.tick_params(axis="x", labelsize=7)
    names = [p.system for p in pickups]
    xs = list(range(len(pickups)))
    pick_ax.bar([x - 0.2 for x in xs], [p.p50_ms for p in pickups], 0.4, label="p50")
    pick_ax.bar([x + 0.2 for x in xs], [p.p99_ms for p in pickups], 0.4, label="p99")
    pick_ax.set_xticks(xs, names)
    pick_ax.set_yscale("log")
    pick_ax.set_ylabel("pickup latency, ms (log)")
    pick_ax.legend(fontsize=8)
    pick_ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"promptq throughput on {platform.node()} ({os.cpu_count()} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {p: version(p) for p in ("arq", "redis", "aiohttp", "sqlalchemy", "asyncpg")},
    }


# -- main ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def private_redis(tmp: Path) -> Iterator[str]:
    """A redis-server of our own on a free port, so that no test run can flush it under us."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(tmp)]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the private redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


async def pg_available(dsn: str) -> bool:
    """True if PostgreSQL answers at `dsn`."""
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Print a stage and how long it took."""
    print(f"  {name} ...", end="", flush=True)
    started = time.monotonic()
    yield
    print(f" {time.monotonic() - started:.1f} s", flush=True)


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Run every selected system on every selected workload."""
    ws = [w for w in workloads(args.scale) if w.name in args.workloads]
    systems = [s for s in SYSTEMS if s in args.systems]
    if "promptq-postgres" in systems and not await pg_available(args.pg_dsn):
        print(f"PostgreSQL is not reachable at {args.pg_dsn}: skipping promptq-postgres")
        systems.remove("promptq-postgres")
    pickup_samples = args.pickup_samples
    if pickup_samples is None:
        pickup_samples = 40 if args.quick else 100
    runs: list[Run] = []
    pickups: list[Pickup] = []
    started, load_at_start = time.monotonic(), os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="promptq-bench-")))
        if args.redis_url is None:
            args.redis_url = stack.enter_context(private_redis(tmp))
        runners: dict[str, Any] = {
            "arq": PlainArq(args.redis_url, tmp),
            "promptq-sqlite": PromptQ("sqlite", args.redis_url, args.pg_dsn, tmp, args.prefetch),
            "promptq-postgres": PromptQ(
                "postgres", args.redis_url, args.pg_dsn, tmp, args.prefetch
            ),
        }
        fake_log = tmp / "fake-llm.log"
        async with FakeLLMProcess(PROMPTQ, free_port(), fake_log) as fake:
            for w in ws:
                print(f"{w.label}")
                for system in systems:
                    if system == "arq" and w.shared_limit:
                        continue  # no global limits in plain arq
                    repeats = 1 if system == "arq" else w.repeats
                    tries: list[Run] = []
                    for i in range(repeats):
                        with stage(system if repeats == 1 else f"{system} ({i + 1}/{repeats})"):
                            if system == "baseline":
                                tries.append(await run_baseline(w, fake))
                                continue
                            samples = pickup_samples if w is ws[0] and i == 0 else 0
                            run, pickup = await runners[system].run(w, fake, samples)
                            tries.append(run)
                            if pickup is not None:
                                pickups.append(pickup)
                    runs.append(median_run(tries))
    return {
        "meta": {
            "quick": args.quick,
            "scale": args.scale,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "duration_s": round(time.monotonic() - started, 1),
            "load_avg_1m_at_start": load_at_start,
            "load_avg_1m_at_end": os.getloadavg()[0],
            "machine": machine(),
            "method": __doc__,
            "targets": TARGETS,
        },
        "workloads": [asdict(w) for w in ws],
        "runs": [asdict(r) for r in runs],
        "pickup": [asdict(p) for p in pickups],
    }


def main() -> None:
    """Parse arguments, run, write JSON and PNG, print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="--scale 0.1: about 5 minutes instead of 12"
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="job-count factor for the LLM-like/zero runs"
    )
    parser.add_argument(
        "--redis-url", help="a Redis db to use (it is flushed!); default: start a private server"
    )
    parser.add_argument("--pg-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--workloads", default="saq,llm,zero,limit")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="output directory")
    parser.add_argument(
        "--prefetch", type=int, default=None, help="PROMPTQ_WORKER_PREFETCH (default: its default)"
    )
    parser.add_argument(
        "--pickup-samples", type=int, default=None, help="pickup jobs (default 100, quick 40)"
    )
    args = parser.parse_args()
    if args.quick:
        args.scale = min(args.scale, 0.1)
    args.systems = args.systems.split(",")
    args.workloads = args.workloads.split(",")
    report = asyncio.run(run_all(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    ws = [Workload(**w) for w in report["workloads"]]
    runs = [Run(**r) for r in report["runs"]]
    pickups = [Pickup(**p) for p in report["pickup"]]
    chart(args.out / "throughput.png", ws, runs, pickups)
    print()
    print(summary_table(ws, runs, pickups))
    print(f"\nwrote {args.out / 'throughput.json'} and {args.out / 'throughput.png'}")


if __name__ == "__main__":
    main()
