"""The CLI on hostile text, narrow terminals, bad arguments and unusable databases.

Given jobs and batches whose names, models and answers look like Rich markup, when the
read commands show them, then they print exactly as stored (and without Redis); given a bad
port, database URL, setting, revision or output path, then the command prints one `error:`
line saying what to fix and exits non-zero, with no traceback and no password.

The commands run in-process (typer's CliRunner) against this test's SQLite file and Redis db;
only `promptq api`, which installs uvloop's event loop policy, runs as a subprocess.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from sqlalchemy import update
from typer.testing import CliRunner

from promptq import clock, migrate
from promptq.batches import BatchService
from promptq.cli import app
from promptq.cli_batch import item_specs
from promptq.models import Job, JobStatus
from promptq.service import parse_job_request
from promptq.settings import Settings
from tests.conftest import base_settings, open_service
from tests.e2e.conftest import Procs, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)]

#: Text that Rich would read as markup (or emoji): it must come out exactly like this.
MODEL = "[/]"
BATCH_NAME = "weird [/] name"
ANSWER = "use an array[/i] [citation needed] :smile: [fake-small]"
#: An endpoints config with a misspelt key.
BAD_ENDPOINTS = '[{{"name": "a", "models": ["x*"], "base_url": "http://h/v1", "limts": {{}}}}]'
UNREACHABLE_PG = "postgresql+asyncpg://postgres:hunter2@127.0.0.1:{port}/nope"


@pytest.fixture
def cli_settings(tmp_path: Path, database_url: str, redis_url: str) -> Settings:
    """Settings for this test's migrated SQLite file and flushed Redis db."""
    return base_settings(tmp_path, database_url, redis_url=redis_url)


def invoke(settings: Settings, *args: str, columns: int = 200, **env: str) -> Result:
    """Run `promptq ARGS` in-process with `settings` (and `env`) as its PROMPTQ_* env."""
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("PROMPTQ_")}
    values = {f"PROMPTQ_{name.upper()}": str(getattr(settings, name)) for name in FIELDS}
    return CliRunner().invoke(app, list(args), env=unset | values | env | {"COLUMNS": str(columns)})


FIELDS = ("data_dir", "database_url", "redis_url", "queue_name", "default_model")


def assert_one_error(result: Result, *expected: str, code: int = 1) -> None:
    """Exit `code` with a single `error:` line containing `expected`, and no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit | None), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], result.stderr


def seed(settings: Settings) -> tuple[str, str, list[str]]:
    """A queued job on model [/] and an answered comparison batch, all with markup-like text;
    (job id, batch id, the batch's job ids)."""

    async def go() -> tuple[str, str, list[str]]:
        async with open_service(settings) as service:
            request = {"kind": "prompt", "messages": [{"role": "user", "content": "hi [b]x"}]}
            job, _ = await service.submit(parse_job_request(request | {"model": MODEL}))
            batches = BatchService(service)
            created = await batches.create(
                item_specs([parse_job_request(request)]),
                owner_key_id=None,
                name=BATCH_NAME,
                models=["[fake-small]", MODEL],
                enqueue=False,
            )
            batch_id = created.batch.id
            async with service.store.sessionmaker() as session, session.begin():
                await session.execute(
                    update(Job)
                    .where(Job.batch_id == batch_id)
                    .values(status=JobStatus.SUCCEEDED, result=ANSWER, finished_at=clock.now())
                )
            return job.id, batch_id, [j async for j in batches.job_ids(batch_id)]

    return asyncio.run(go())


def test_stored_text_prints_verbatim_and_reads_need_no_redis(cli_settings: Settings) -> None:
    job_id, batch_id, answered = seed(cli_settings)
    # Reads only: with Redis gone they must still work.
    settings = cli_settings.with_overrides(redis_url=f"redis://127.0.0.1:{free_port()}/0")

    listed = invoke(settings, "list")
    assert listed.exit_code == 0, listed.output
    assert f" {MODEL} " in listed.stdout

    shown = invoke(settings, "get", job_id)
    assert shown.exit_code == 0, shown.output
    assert MODEL in shown.stdout and "None" not in shown.stdout
    answer = invoke(settings, "get", answered[0])
    assert answer.exit_code == 0 and ANSWER in answer.stdout, answer.output

    for args in (("batch", "list"), ("batch", "get", batch_id)):
        batch = invoke(settings, *args)
        assert batch.exit_code == 0 and BATCH_NAME in batch.stdout, batch.output
        assert "Redis" not in batch.stderr, batch.stderr

    compared = invoke(settings, "batch", "compare", batch_id, columns=250)
    assert compared.exit_code == 0, compared.output
    assert ANSWER in compared.stdout and "[fake-small]" in compared.stdout

    results = invoke(settings, "batch", "results", batch_id)
    assert results.exit_code == 0 and results.stdout.count(ANSWER) == 2, results.output


def test_list_shows_whole_ids_and_dates_on_a_narrow_terminal(cli_settings: Settings) -> None:
    job_id, _, _ = seed(cli_settings)
    listed = invoke(cli_settings, "list", columns=80)
    assert listed.exit_code == 0, listed.output
    (line,) = [line for line in listed.stdout.splitlines() if line.startswith(job_id)]
    assert line.split()[-2:][0].count("-") == 2  # the date and the time on one line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("api", "--port", "99999"), "65535"),
        (("api", "--port", "-1"), "greater than or equal to 0"),
        (("up", "--port", "65536"), "65535"),
        (("fake-llm", "--port", "99999"), "65535"),
        (("fake-llm", "--latency-ms", "-5"), "greater than or equal to 0"),
        (("fake-llm", "--chars-per-token", "nan"), "chars_per_token"),
        (("submit", "prompt", "x", "--timeout-s", "-1", "--wait"), "above 0"),
        (("submit", "prompt", "x", "--deadline-s", "nan"), "above 0"),
    ],
)
def test_bad_numbers_are_refused_before_anything_runs(
    cli_settings: Settings, args: tuple[str, ...], expected: str
) -> None:
    result = invoke(cli_settings, *args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert expected in result.output and "Traceback" not in result.output


def test_a_refused_timeout_creates_no_job(cli_settings: Settings) -> None:
    result = invoke(cli_settings, "submit", "prompt", "x", "--timeout-s", "-1", "--wait")
    assert result.exit_code == 2
    listed = invoke(cli_settings, "list")
    assert listed.stdout.strip().splitlines() == [listed.stdout.strip()]  # the header alone


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_fake_llm_on_a_taken_port(cli_settings: Settings, taken_port: int) -> None:
    result = invoke(cli_settings, "fake-llm", "--port", str(taken_port))
    assert_one_error(result, f"port {taken_port} is in use", "--port")


def test_fake_llm_on_a_host_that_is_not_here(cli_settings: Settings) -> None:
    result = invoke(cli_settings, "fake-llm", "--host", "192.0.2.1", "--port", "0")
    assert_one_error(result, "cannot listen on '192.0.2.1'", "not an address of this machine")


def test_api_on_a_taken_port(cli_settings: Settings, taken_port: int, tmp_path: Path) -> None:
    result = Procs(cli_settings, tmp_path).run_sync("api", "--port", str(taken_port))
    assert result.returncode == 1, result.stderr
    assert f"error: port {taken_port} is in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_metrics_on_a_taken_port(
    cli_settings: Settings, taken_port: int, tmp_path: Path
) -> None:
    result = Procs(cli_settings, tmp_path).run_sync(
        "worker", "--metrics-port", str(taken_port), "--burst"
    )
    assert result.returncode == 1, result.stderr
    assert "error: " in result.stderr and str(taken_port) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("command", "env", "expected"),
    [
        (("list",), {"DATABASE_URL": UNREACHABLE_PG}, ["cannot use the database"]),
        (("get", "x"), {"DATABASE_URL": UNREACHABLE_PG}, ["PROMPTQ_DATABASE_URL"]),
        (("submit", "prompt", "hi"), {"DATABASE_URL": UNREACHABLE_PG}, ["start it"]),
        (("keys", "list"), {"DATABASE_URL": UNREACHABLE_PG}, ["cannot use the database"]),
        (("db", "upgrade"), {"DATABASE_URL": UNREACHABLE_PG}, ["cannot use the database"]),
        (("list",), {"DATABASE_URL": "sqlite:////tmp/x.db"}, ["use sqlite+aiosqlite:////tmp/x.db"]),
        (("list",), {"DATABASE_URL": "bogus://u:hunter2@h/x"}, ["SQLite or PostgreSQL"]),
        (("list",), {"DATABASE_URL": "::nonsense"}, ["not a database URL"]),
        (("list",), {"WORKER_CONCURRENCY": "abc"}, ["PROMPTQ_WORKER_CONCURRENCY"]),
        (("list",), {"API_PORT": "99999"}, ["PROMPTQ_API_PORT"]),
        (("list",), {"LOG_LEVEL": "LOUD"}, ["PROMPTQ_LOG_LEVEL=LOUD", "INFO"]),
        (("worker",), {"LLM_TIMEOUT_S": "inf"}, ["PROMPTQ_LLM_TIMEOUT_S", "finite"]),
        (("api",), {"LEASE_S": "nan"}, ["PROMPTQ_LEASE_S", "finite"]),
        # The services check what they need before they start serving
        (("api",), {"DATABASE_URL": UNREACHABLE_PG}, ["cannot use the database"]),
        (("worker",), {"DATABASE_URL": UNREACHABLE_PG}, ["cannot use the database"]),
        (("api",), {"DATABASE_URL": "sqlite+aiosqlite:///{tmp}/new.db"}, ["db upgrade"]),
        (("worker",), {"DATABASE_URL": "sqlite+aiosqlite:///{tmp}/new.db"}, ["db upgrade"]),
        (("api",), {"ENDPOINTS": BAD_ENDPOINTS}, ["PROMPTQ_ENDPOINTS", "limts"]),
        (("worker",), {"ENDPOINTS": BAD_ENDPOINTS}, ["PROMPTQ_ENDPOINTS", "limts"]),
        (("api",), {"REDIS_URL": "redis://127.0.0.1:{port}/0"}, ["PROMPTQ_REDIS_URL"]),
    ],
)
def test_unusable_database_or_settings_is_one_error_line(
    cli_settings: Settings,
    command: tuple[str, ...],
    env: dict[str, str],
    expected: list[str],
    tmp_path: Path,
) -> None:
    values = {f"PROMPTQ_{k}": v.format(port=free_port(), tmp=tmp_path) for k, v in env.items()}
    result = invoke(cli_settings, *command, **values)
    assert_one_error(result, *expected)
    assert "hunter2" not in result.output


def test_get_and_list_on_a_database_never_migrated(cli_settings: Settings, tmp_path: Path) -> None:
    settings = cli_settings.with_overrides(database_url=f"sqlite+aiosqlite:///{tmp_path}/new.db")
    for command in (("list",), ("get", "x")):
        assert_one_error(invoke(settings, *command), "migration none", "promptq db upgrade")


def test_db_commands_print_the_revision_the_database_is_at(cli_settings: Settings) -> None:
    head = invoke(cli_settings, "db", "upgrade", "0003")  # already past it: stays at head
    assert head.exit_code == 0, head.output
    assert head.stdout.strip().endswith(f" is at head ({migrate.head_revision()})")

    down = invoke(cli_settings, "db", "downgrade", "0006")
    assert down.exit_code == 0 and down.stdout.strip().endswith(" is at 0006"), down.output

    assert_one_error(invoke(cli_settings, "db", "upgrade", "bogus"), "'bogus'", code=2)


def test_results_to_an_unwritable_path(cli_settings: Settings, tmp_path: Path) -> None:
    _, batch_id, _ = seed(cli_settings)
    for target in (tmp_path / "missing" / "x.csv", tmp_path):
        result = invoke(cli_settings, "batch", "results", batch_id, "-o", str(target))
        assert_one_error(result, f"cannot write {target}", code=2)


def test_batch_without_a_command_shows_its_help(cli_settings: Settings) -> None:
    result = invoke(cli_settings, "batch")
    assert "Missing command" not in result.output
    assert "compare" in result.output and "results" in result.output


def test_help_texts_read_as_written(cli_settings: Settings) -> None:
    fake = invoke(cli_settings, "fake-llm", "--help")
    assert "`[[fake: ...]]`" in fake.stdout
    short: dict[str, Any] = {}
    for line in invoke(cli_settings, "--help").stdout.splitlines():
        words = line.strip("│ ").split(maxsplit=1)
        if words and words[0] in ("cancel", "endpoints"):
            short[words[0]] = words[1]
    assert short["cancel"].endswith("aborted."), short
    assert short["endpoints"].endswith("now."), short


def test_endpoints_table_shows_urls_whole(cli_settings: Settings, tmp_path: Path) -> None:
    url = "https://a-rather-long-host-name.example.com/some/deep/path/v1"
    config = tmp_path / "endpoints.toml"
    config.write_text(
        f'[[endpoints]]\nname = "remote"\nmodels = ["gpt-*"]\nbase_url = "{url}"\n'
        'api_key_env = "A_VERY_LONG_ENDPOINT_API_KEY_VARIABLE_NAME"\n'
    )
    shown = invoke(cli_settings, "endpoints", columns=80, PROMPTQ_ENDPOINTS_FILE=str(config))
    assert shown.exit_code == 0, shown.output
    assert "…" not in shown.stdout
