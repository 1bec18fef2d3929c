"""`promptq endpoints` as a real subprocess: the table, live numbers from Redis, no secrets,
and a clear error for a bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from redis.asyncio import Redis

from promptq.limits import RedisLimits, ScopeLimits
from promptq.settings import Settings
from tests.e2e.conftest import Procs

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]

CONFIG = """
[[endpoints]]
name = "remote"
models = ["gpt-*"]
base_url = "https://api.example.com/v1"
api_key_env = "E2E_ENDPOINT_KEY"
[endpoints.limits]
max_in_flight = 5
rpm = 100
"""


async def test_endpoints_table_shows_limits_and_live_state_but_no_key(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "endpoints.toml"
    path.write_text(CONFIG)
    monkeypatch.setenv("E2E_ENDPOINT_KEY", "sk-e2e-very-secret")
    procs = Procs(settings.with_overrides(endpoints_file=path), tmp_path)
    redis = Redis.from_url(settings.redis_url)
    try:
        limits = RedisLimits(redis, settings.queue_name)
        for i in range(2):  # two calls in flight somewhere
            grant = await limits.acquire(
                "remote", ScopeLimits(max_in_flight=5), permit_id=f"p{i}", lease_s=60, tokens=1
            )
            assert grant.granted
    finally:
        await redis.aclose()

    shown = await procs.run("endpoints", "--json")
    assert shown.returncode == 0, shown.stderr
    assert "sk-e2e-very-secret" not in shown.stdout + shown.stderr
    data = json.loads(shown.stdout)
    remote, default = data["endpoints"]
    assert (remote["name"], remote["api_key_env"], remote["api_key_set"]) == (
        "remote",
        "E2E_ENDPOINT_KEY",
        True,
    )
    assert remote["limits"]["max_in_flight"] == 5
    assert remote["scopes"][0]["in_flight"] == 2
    assert default["name"] == "default"

    table = await procs.run("endpoints")
    assert table.returncode == 0, table.stderr
    assert "remote" in table.stdout and "sk-e2e" not in table.stdout


async def test_a_bad_endpoints_file_is_a_clear_cli_error(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "endpoints.toml"
    path.write_text(CONFIG.replace("rpm = 100", "rpm = -5"))
    procs = Procs(settings.with_overrides(endpoints_file=path), tmp_path)
    for command in (("endpoints",), ("worker", "--burst")):
        result = await procs.run(*command)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        message = " ".join(result.stderr.split())
        assert "endpoints.toml" in message  # the file (rich may wrap its long path)
        assert "limits.rpm" in message
