"""No secret at rest or in logs: provider and API keys never reach SQL, Redis, logs or errors.

Given real `promptq api` and `promptq worker` processes logging at DEBUG (console lines with
SQLite, JSON lines with PostgreSQL), a provider key in
PROMPTQ_LLM_API_KEY, and API keys made with `promptq keys create`, when jobs fail with errors
in which the model endpoint quotes the Authorization header back (as JSON, and as a plain-text
dump cut right through the key), and clients send wrong, revoked and misplaced keys, then
neither the provider key nor any API key, nor any 12-character piece of one, appears in a dump
of every SQL table, in Redis, in any log line or in any HTTP body.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from sqlalchemy import MetaData, select

from promptq.db import create_engine
from promptq.settings import Settings
from promptq.testing.fake_llm import FakeLLM
from tests.conftest import wait_for
from tests.e2e.conftest import Procs, free_port, wait_healthy
from worker.llm import MAX_ERROR_BODY_CHARS

pytestmark = pytest.mark.e2e

#: Any piece of a secret this long counts as a leak (random text: no false positives).
PIECE_CHARS = 12


def pieces(secret: str) -> set[str]:
    """Every PIECE_CHARS-long substring of a secret's random part."""
    body = secret.split("_", 1)[-1] if secret.startswith("pq_") else secret
    return {body[i : i + PIECE_CHARS] for i in range(len(body) - PIECE_CHARS + 1)}


def leaks(haystack: str, named_secrets: dict[str, str]) -> list[str]:
    """Names of the secrets of which some piece occurs in `haystack`."""
    return [name for name, s in named_secrets.items() if any(p in haystack for p in pieces(s))]


def _run(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


async def dump_sql(settings: Settings) -> str:
    """Every row of every table, as the database's own dump tool writes it (or via SQL)."""
    url = settings.resolved_database_url
    if url.startswith("sqlite") and shutil.which("sqlite3"):
        path = url.split(":///", 1)[1]
        return await asyncio.to_thread(_run, ["sqlite3", path, ".dump"])
    if url.startswith("postgresql") and shutil.which("pg_dump"):
        dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
        return await asyncio.to_thread(_run, ["pg_dump", "--data-only", "--inserts", dsn])
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            metadata = MetaData()
            await conn.run_sync(metadata.reflect)
            rows = [
                f"{table.name}: {list(await conn.execute(select(table)))}"
                for table in metadata.sorted_tables
            ]
    finally:
        await engine.dispose()
    return "\n".join(rows)


async def dump_redis(url: str) -> str:
    """Every key of the test's Redis database with its value."""
    client = aioredis.Redis.from_url(url)
    out = []
    try:
        async for key in client.scan_iter():
            kind = (await client.type(key)).decode()
            value: Any
            if kind == "string":
                value = await client.get(key)
            elif kind == "hash":
                value = await client.hgetall(key)
            elif kind == "list":
                value = await client.lrange(key, 0, -1)
            elif kind == "set":
                value = await client.smembers(key)
            elif kind == "zset":
                value = await client.zrange(key, 0, -1, withscores=True)
            elif kind == "stream":
                value = await client.xrange(key)
            else:
                value = kind
            out.append(f"{key!r}: {value!r}")
    finally:
        await client.aclose()
    return "\n".join(out)


async def test_no_secret_in_sql_redis_logs_or_error_bodies(
    settings: Settings, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    # Given a provider key, the real services, and API keys from the CLI
    provider_key = "sk-test-" + secrets.token_urlsafe(24)
    # Both log formats, one per database (each run is costly)
    log_format = "json" if settings.resolved_database_url.startswith("postgres") else "console"
    procs = Procs(
        settings.with_overrides(
            api_port=free_port(),
            llm_api_key=provider_key,
            log_level="DEBUG",
            log_format=log_format,
            llm_timeout_s=2.0,
        ),
        tmp_path,
    )
    http_bodies: list[str] = []
    try:
        api = procs.start("api", "--port", str(procs.settings.api_port), name="api")
        base_url = f"http://127.0.0.1:{procs.settings.api_port}"
        await wait_healthy(base_url, api)
        procs.start("worker", "--concurrency", "2", name="worker")
        made = {"tenant": [], "admin": ["--admin"], "revoked": []}
        results = await asyncio.gather(
            *(procs.run("keys", "create", "--name", name, *extra) for name, extra in made.items())
        )
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        created = {name: r.stdout.strip() for name, r in zip(made, results, strict=True)}
        revoked = await procs.run("keys", "revoke", "revoked")
        assert revoked.returncode == 0, revoked.stderr
        named_secrets = {
            "provider key": provider_key,
            **{f"{name} API key": key for name, key in created.items()},
            "wrong API key": "pq_" + secrets.token_urlsafe(32),
        }
        tenant = {"Authorization": f"Bearer {created['tenant']}"}
        # The raw dump is cut (at MAX_ERROR_BODY_CHARS) in the middle of the echoed key.
        pad = MAX_ERROR_BODY_CHARS - len("\nAuthorization: Bearer ") - len(provider_key) // 2
        prompts = {
            "ok": "a harmless question",
            "json echo": "[[fake: echo_auth]]",
            "raw echo": f"[[fake: echo_auth_raw:{pad}, echo_auth_raw:{pad}]]",
        }

        async with aiohttp.ClientSession(base_url) as http:

            async def call(method: str, path: str, **kw: Any) -> tuple[int, Any]:
                async with http.request(method, path, **kw) as response:
                    text = await response.text()
                    http_bodies.append(f"{response.status} {dict(response.headers)} {text}")
                    return response.status, await response.json() if text else None

            # When jobs run, fail with the key quoted back, and clients use bad keys
            job_ids = {}
            for name, content in prompts.items():
                body = {
                    "kind": "prompt",
                    "messages": [{"role": "user", "content": content}],
                    "max_attempts": 2,
                }
                status, job = await call("POST", "/api/jobs", json=body, headers=tenant)
                assert status == 202, job
                job_ids[name] = job["id"]
            jobs: dict[str, Any] = {}

            async def all_finished() -> bool:
                for name, job_id in job_ids.items():
                    _, jobs[name] = await call("GET", f"/api/jobs/{job_id}", headers=tenant)
                return all(job["status"] in ("succeeded", "failed") for job in jobs.values())

            await wait_for(all_finished, timeout_s=30, interval_s=0.05)
            for job_id in job_ids.values():
                await call("GET", f"/api/jobs/{job_id}/attempts", headers=tenant)
            bad_headers = [
                {"Authorization": f"Bearer {named_secrets['wrong API key']}"},
                {"Authorization": f"Bearer {created['revoked']}"},
                {"Authorization": f"Token {created['tenant']}"},
                {"Authorization": f"Bearer {created['tenant']} {created['admin']}"},
                {"X-Api-Key": created["admin"]},
            ]
            for headers in bad_headers:
                status, body = await call("GET", "/api/jobs", headers=headers)
                assert status == 401, body
            status, _ = await call("GET", f"/api/jobs/{job_ids['ok']}?key={created['tenant']}")
            assert status == 401
            admin = {"Authorization": f"Bearer {created['admin']}"}
            status, _ = await call("GET", "/api/jobs", headers=admin)
            assert status == 200
    finally:
        procs.stop_all()

    # Then the leak paths were really taken
    assert f"Bearer {provider_key}" in fake_llm.stats.authorization_headers
    assert jobs["ok"]["status"] == "succeeded"
    assert jobs["json echo"]["status"] == "failed"
    assert "Incorrect API key provided" in jobs["json echo"]["error"]
    assert jobs["raw echo"]["status"] == "failed" and jobs["raw echo"]["attempts"] == 2
    assert "Authorization: ***" in jobs["raw echo"]["error"]

    # And no secret is anywhere
    places = {
        "SQL": await dump_sql(procs.settings),
        "Redis": await dump_redis(procs.settings.redis_url),
        "logs": procs.logs(max_chars=None),
        "HTTP bodies": "\n".join(http_bodies),
    }
    assert "job_attempts" in places["SQL"] and jobs["ok"]["id"] in places["SQL"]
    assert "succeeded on attempt 1" in places["logs"]
    for place, text in places.items():
        assert leaks(text, named_secrets) == [], place
