"""Batch ingest benchmark: a 100k-item JSONL upload through the real API on PostgreSQL.

Run `python -m bench.ingest` (about a minute; `--items N` to change the size). It needs Redis
(a private redis-server is started) and PostgreSQL (a fresh database is created and dropped).

In one run, against one `promptq api` subprocess (auth off) and one database:

* batch: `POST /api/batches` with the whole file as application/x-ndjson: validation, bulk
  INSERT, pipelined enqueue; timed from the first byte sent to the 201.
* per-job API: the same items through `POST /api/jobs`, 16 at a time, for a sample
  (`--sample`), extrapolated to all items: what a client would do without batches.
* raw floor: the same rows written straight to PostgreSQL with COPY and to Redis with plain
  pipelined SET + ZADD, no validation and no API: a lower bound for any ingest path.

The API's peak RSS (VmHWM) is read after a warm-up batch of 1/10 the size and again after the
full one: flat memory means the second is not much higher than the first.
Results go to bench/results/ingest.json. Numbers are for this machine only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import psutil
import redis.asyncio

from bench.throughput import pg_available, private_redis
from promptq import clock, migrate
from promptq.settings import Settings

PROMPTQ = str(Path(sys.executable).with_name("promptq"))
RESULTS = Path(__file__).parent / "results" / "ingest.json"
QUEUE = "promptq:bench-ingest"
#: Concurrent requests of the per-job baseline.
PER_JOB_CONCURRENCY = 16


def write_items(path: Path, n: int, tag: str) -> int:
    """n prompt job requests as JSONL; returns the file's size in bytes."""
    with path.open("wb") as out:
        for i in range(n):
            item = {
                "kind": "prompt",
                "custom_id": f"{tag}-{i}",
                "messages": [{"role": "user", "content": f"Summarize item {i} of {tag} in a line"}],
                "params": {"temperature": 0.2, "max_tokens": 64},
            }
            out.write(orjson.dumps(item) + b"\n")
    return path.stat().st_size


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size (VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float(psutil.Process(pid).memory_info().rss) / 2**20


async def upload(session: aiohttp.ClientSession, base: str, path: Path) -> tuple[float, Any]:
    """POST a JSONL file as one batch; (seconds, response body)."""
    started = time.perf_counter()
    with path.open("rb") as body:
        async with session.post(
            f"{base}/api/batches?name={path.stem}",
            data=body,
            headers={"Content-Type": "application/x-ndjson"},
        ) as response:
            data = await response.json()
            if response.status != 201:
                raise RuntimeError(f"batch upload failed: {response.status} {data}")
    return time.perf_counter() - started, data


async def per_job(session: aiohttp.ClientSession, base: str, path: Path, n: int) -> float:
    """Seconds to POST the first n items one job per request, PER_JOB_CONCURRENCY at a time."""
    items = []
    with path.open("rb") as source:
        for line in source:
            item = orjson.loads(line)
            item.pop("custom_id")
            items.append(item)
            if len(items) == n:
                break
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def post_all() -> None:
        while not queue.empty():
            item = queue.get_nowait()
            async with session.post(f"{base}/api/jobs", json=item) as response:
                if response.status != 202:
                    raise RuntimeError(f"POST /api/jobs failed: {response.status}")
                await response.read()

    started = time.perf_counter()
    await asyncio.gather(*(post_all() for _ in range(PER_JOB_CONCURRENCY)))
    return time.perf_counter() - started


async def raw_floor(pg_dsn: str, redis_url: str, path: Path) -> float:
    """Seconds to COPY the items' rows into `jobs` and SET + ZADD them in Redis, unchecked."""
    started = time.perf_counter()
    now = clock.now()
    records = []
    with path.open("rb") as source:
        for line in source:
            item = orjson.loads(line)
            job_input = {"messages": item["messages"], "params": item["params"]}
            records.append(
                (clock.new_id(), "prompt", "queued", "m", orjson.dumps(job_input).decode(),
                 0, 0, 5, 5, item["custom_id"], 0, now, now)
            )  # fmt: skip
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.copy_records_to_table(
            "jobs",
            records=records,
            columns=[
                "id", "kind", "status", "model", "input", "attempts", "interruptions",
                "max_attempts", "attempt_budget", "custom_id", "priority", "created_at",
                "updated_at",
            ],
        )  # fmt: skip
    finally:
        await conn.close()
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        now_ms = int(time.time() * 1000)
        for start in range(0, len(records), 1000):
            async with client.pipeline(transaction=False) as pipe:
                for record in records[start : start + 1000]:
                    job = orjson.dumps({"t": None, "f": "run_job", "a": [record[0]], "k": {}})
                    pipe.set(f"floor:job:{record[0]}", job, px=604_800_000)
                    pipe.zadd("floor:queue", {record[0]: now_ms})
                await pipe.execute()
    finally:
        await client.aclose()
    return time.perf_counter() - started


def start_api(port: int, env: dict[str, str], log: Any) -> subprocess.Popen[bytes]:
    """`promptq api` on `port` in the background."""
    return subprocess.Popen(
        [PROMPTQ, "api", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )


async def wait_up(base: str, proc: subprocess.Popen[bytes]) -> None:
    """Wait until the API answers /healthz."""
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("the API exited during start-up")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{base}/healthz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError("the API did not come up")


def api_phases(log: str) -> dict[str, float]:
    """The full batch's phases, from the API's log: validation, insert, enqueue (seconds)."""
    validated = re.findall(r"item\(s\) validated in ([0-9.]+) s", log)
    stored = re.findall(r"created in ([0-9.]+) s .*?, \d+ reused, \d+ queued in ([0-9.]+) s", log)
    if not validated or not stored:
        return {}
    return {
        "validate": float(validated[-1]),
        "insert": float(stored[-1][0]),
        "enqueue": float(stored[-1][1]),
    }


def calibrate_s() -> float:
    """Seconds for a fixed pure-Python loop (about 0.15 s on an idle modern core): how busy
    the machine was, to read the other numbers by."""
    started = time.perf_counter()
    sum(range(10**7))
    return round(time.perf_counter() - started, 3)


async def run(args: argparse.Namespace, redis_url: str, tmp: Path) -> dict[str, Any]:
    """The whole benchmark; returns the results."""
    calibration_s = calibrate_s()
    db = f"promptq_bench_ingest_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.pg_dsn)
    await admin.execute(f"CREATE DATABASE {db}")
    await admin.close()
    pg_db = args.pg_dsn.rsplit("/", 1)[0] + f"/{db}"
    try:
        settings = Settings(
            _env_file=None,
            data_dir=tmp,
            database_url=pg_db.replace("postgresql://", "postgresql+asyncpg://", 1),
            redis_url=redis_url,
            queue_name=QUEUE,
            auth_disabled=True,
            batch_max_items=max(args.items, 100_000),
        )
        await asyncio.to_thread(migrate.upgrade, settings)
        port = args.port
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")}
        env |= {
            "PROMPTQ_DATABASE_URL": settings.database_url,
            "PROMPTQ_REDIS_URL": redis_url,
            "PROMPTQ_QUEUE_NAME": QUEUE,
            "PROMPTQ_AUTH_DISABLED": "true",
            "PROMPTQ_BATCH_MAX_ITEMS": str(settings.batch_max_items),
            "PROMPTQ_LOG_LEVEL": "INFO",
        }
        log = (tmp / "api.log").open("wb")
        proc = start_api(port, env, log)
        base = f"http://127.0.0.1:{port}"
        try:
            await wait_up(base, proc)
            idle_mb = peak_rss_mb(proc.pid)
            warm, full = tmp / "warmup.jsonl", tmp / "items.jsonl"
            write_items(warm, max(1, args.items // 10), "warmup")
            size = write_items(full, args.items, "items")
            timeout = aiohttp.ClientTimeout(total=None)
            client = redis.asyncio.Redis.from_url(redis_url)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                warm_s, _ = await upload(session, base, warm)
                warm_mb = peak_rss_mb(proc.pid)
                before = await client.zcard(QUEUE)
                batch_s, body = await upload(session, base, full)
                full_mb = peak_rss_mb(proc.pid)
                queued = await client.zcard(QUEUE) - before
                per_job_s = await per_job(session, base, full, args.sample)
            await client.aclose()
        finally:
            proc.terminate()
            proc.wait(10)
            log.close()
        phases = api_phases((tmp / "api.log").read_text(errors="replace"))
        floor_s = await raw_floor(pg_db, redis_url, full)
    finally:
        admin = await asyncpg.connect(args.pg_dsn)
        await admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        await admin.close()

    per_job_total_s = per_job_s / args.sample * args.items
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1m": round(os.getloadavg()[0], 1),
            "calibration_s": calibration_s,
        },
        "items": args.items,
        "upload_bytes": size,
        "batch": {
            "seconds": round(batch_s, 2),
            "items_per_s": round(args.items / batch_s),
            "created": body["created"],
            "queued_in_redis": queued,
            "warmup_items": max(1, args.items // 10),
            "warmup_seconds": round(warm_s, 2),
        },
        "api_peak_rss_mb": {
            "idle": round(idle_mb, 1),
            "after_warmup_batch": round(warm_mb, 1),
            "after_full_batch": round(full_mb, 1),
        },
        "api_phases_seconds": phases,
        "per_job_api": {
            "sample": args.sample,
            "concurrency": PER_JOB_CONCURRENCY,
            "sample_seconds": round(per_job_s, 2),
            "extrapolated_seconds": round(per_job_total_s, 1),
        },
        "raw_floor_seconds": round(floor_s, 2),
        "ratios": {
            "per_job_api_over_batch": round(per_job_total_s / batch_s, 1),
            "batch_over_raw_floor": round(batch_s / floor_s, 2),
        },
        "target_seconds": 10.0,
        "meets_target": batch_s <= 10.0,
    }


def main() -> None:
    """Parse arguments, run, print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--sample", type=int, default=2000, help="items for the per-job API")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--pg-dsn",
        default=os.environ.get(
            "PROMPTQ_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not asyncio.run(pg_available(args.pg_dsn)):
        sys.exit(f"PostgreSQL is not reachable at {args.pg_dsn}")
    with tempfile.TemporaryDirectory() as tmp, private_redis(Path(tmp)) as redis_url:
        results = asyncio.run(run(args, redis_url, Path(tmp)))
    text = json.dumps(results, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
