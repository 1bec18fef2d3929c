"""API keys through the real CLI and a real `promptq api` process.

Given keys made with `promptq keys create`, when they are used against a running API, listed and
revoked with the CLI, then a printed key works until it is revoked and is then refused, and its
plaintext is nowhere: not in the database, not in `keys list`, not in the API's log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from promptq.db import create_engine
from promptq.keys import hash_key
from promptq.settings import Settings
from tests.conftest import bearer
from tests.e2e.conftest import Procs, wait_healthy

pytestmark = pytest.mark.e2e

PROMPT = {"kind": "prompt", "messages": [{"role": "user", "content": "hello"}]}


async def http(url: str, method: str, key: str | None, json: Any = None) -> tuple[int, Any]:
    """One HTTP call with an optional key; (status, JSON body)."""
    headers = bearer(key) if key else {}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, json=json, headers=headers) as response,
    ):
        return response.status, await response.json()


async def list_keys(procs: Procs) -> list[dict[str, Any]]:
    """`promptq keys list --json`, parsed."""
    result = await procs.run("keys", "list", "--json")
    assert result.returncode == 0, result.stderr
    keys: list[dict[str, Any]] = json.loads(result.stdout)
    return keys


async def dump_database(settings: Settings) -> str:
    """Every row of every promptq table, as one string; plus, for SQLite, the raw files."""
    engine = create_engine(settings)
    try:
        async with engine.connect() as connection:
            rows = [
                str((await connection.execute(text(f"SELECT * FROM {table}"))).fetchall())
                for table in ("api_keys", "jobs", "job_attempts")
            ]
    finally:
        await engine.dispose()
    url = make_url(settings.resolved_database_url)
    if url.get_backend_name() == "sqlite" and url.database:
        for path in Path(url.database).parent.glob(Path(url.database).name + "*"):
            rows.append(path.read_bytes().decode("latin-1"))
    return "\n".join(rows)


async def test_key_lifecycle_through_the_cli(procs: Procs) -> None:
    # Given an API that re-checks keys on every request (no cache), so revocation shows at once
    procs.settings = procs.settings.with_overrides(api_key_cache_s=0)
    api = procs.start("api", "--port", str(procs.settings.api_port), name="api")
    base = f"http://127.0.0.1:{procs.settings.api_port}"
    await wait_healthy(base, api)

    # When keys are created, then each is printed once, alone on stdout
    created = await procs.run("keys", "create", "--name", "alice")
    assert created.returncode == 0, created.stderr
    alice = created.stdout.strip()
    assert alice.startswith("pq_") and len(alice) >= 46 and "\n" not in alice
    assert "cannot be shown again" in created.stderr and alice[:8] in created.stderr
    admin_run = await procs.run("keys", "create", "--name", "ops", "--admin")
    assert admin_run.returncode == 0, admin_run.stderr
    ops = admin_run.stdout.strip()
    bob_run = await procs.run("keys", "create", "--name", "bob")
    bob = bob_run.stdout.strip()

    # And names are unique and checked
    again = await procs.run("keys", "create", "--name", "alice")
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = await procs.run("keys", "create", "--name", "no spaces please")
    assert bad.returncode == 2 and "not valid" in bad.stderr

    # And only hashes are stored: no key appears anywhere in the database
    database = await dump_database(procs.settings)
    for key in (alice, ops, bob):
        assert hash_key(key) in database
        assert key not in database

    # And `keys list` shows names, full ids, prefixes and roles, never the keys
    listing = await procs.run("keys", "list")
    assert listing.returncode == 0, listing.stderr
    listed = await list_keys(procs)
    assert [(k["name"], k["prefix"], k["admin"]) for k in listed] == [
        ("alice", alice[:8], False),
        ("ops", ops[:8], True),
        ("bob", bob[:8], False),
    ]
    for key in listed:
        assert key["id"] in listing.stdout and key["name"] in listing.stdout
        assert key["revoked_at"] is None
    assert alice not in listing.stdout and ops not in listing.stdout

    # When alice's key is used, then it works; without a key nothing does
    status, job = await http(f"{base}/api/jobs", "POST", alice, PROMPT)
    assert status == 202, job
    assert (await http(f"{base}/api/jobs/{job['id']}", "GET", alice))[0] == 200
    assert (await http(f"{base}/api/jobs/{job['id']}", "GET", bob))[0] == 404
    assert (await http(f"{base}/api/jobs/{job['id']}", "GET", ops))[0] == 200
    assert (await http(f"{base}/api/jobs", "GET", None))[0] == 401
    assert (await http(f"{base}/healthz", "GET", None))[0] == 200

    # And the CLI, which reads the database directly, acts as admin
    shown = await procs.run("get", job["id"])
    assert shown.returncode == 0 and job["id"] in shown.stdout

    # When alice's key is revoked by name and bob's by id, then both are refused
    revoked = await procs.run("keys", "revoke", "alice")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stderr
    bob_id = next(k["id"] for k in listed if k["name"] == "bob")
    assert (await procs.run("keys", "revoke", bob_id)).returncode == 0
    for key in (alice, bob):
        status, body = await http(f"{base}/api/jobs", "GET", key)
        assert status == 401 and body["error"]["code"] == "unauthorized"
    assert (await http(f"{base}/api/jobs", "GET", ops))[0] == 200

    # And the listing says so; revoking again is harmless; an unknown key is an error
    revoked_names = {k["name"] for k in await list_keys(procs) if k["revoked_at"] is not None}
    assert revoked_names == {"alice", "bob"}
    assert (await procs.run("keys", "revoke", "alice")).returncode == 0
    unknown = await procs.run("keys", "revoke", "carol")
    assert unknown.returncode == 2 and "no API key named 'carol'" in unknown.stderr

    # And no key ever reached the API's log or the CLI's output
    outputs = procs.logs() + listing.stdout + revoked.stdout + revoked.stderr
    for key in (alice, ops, bob):
        assert key not in outputs


async def test_keys_commands_need_a_migrated_database(procs: Procs, tmp_path: Path) -> None:
    procs.settings = procs.settings.with_overrides(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    )
    result = await procs.run("keys", "list")
    assert result.returncode == 1 and "promptq db upgrade" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
