"""Log lines: JSON or console, the job context on every line of a job, secrets never written."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from promptq.logs import Redactor, bind_job, configure_logging
from promptq.settings import Settings

KEY = "pq_" + "A1b2C3d4" * 5 + "xyz"


@pytest.mark.parametrize(
    ("text", "leaked"),
    [
        (f"Authorization: Bearer {KEY}", KEY),
        (f"got key {KEY} from the header", KEY),
        ("{'Authorization': 'Bearer abc.def-ghi'}", "abc.def-ghi"),
        ("calling with sk-proj-0123456789abcdefXYZ", "0123456789abcdefXYZ"),
        ("postgresql+asyncpg://promptq:hunter2pw@db:5432/promptq", "hunter2pw"),
        ("redis: redis://:hunter2pw@127.0.0.1:6379/1", "hunter2pw"),
        ("rediss://:hunter2pw@cache.internal:6380/0", "hunter2pw"),
        ("the configured key is my-own-llm-secret", "my-own-llm-secret"),
    ],
)
def test_redactor_removes_secrets(text: str, leaked: str) -> None:
    redacted = Redactor(["my-own-llm-secret"])(text)
    assert leaked not in redacted
    assert "***" in redacted


def test_redactor_keeps_ordinary_text() -> None:
    text = "job 01a2 succeeded on attempt 2 in 120 ms (bearer of good news)"
    assert (
        Redactor()(text) == text.replace("bearer of", "bearer ***")
        or Redactor()("job 01a2 succeeded on attempt 2 in 120 ms")
        == "job 01a2 succeeded on attempt 2 in 120 ms"
    )


async def test_json_lines_carry_the_job_context_into_child_tasks(restore_logging: None) -> None:
    stream = io.StringIO()
    settings = Settings(_env_file=None, log_format="json", llm_api_key="secret-llm-key-123")  # type: ignore[call-arg]
    configure_logging(settings, stream=stream)
    log = logging.getLogger("promptq.test")

    async def job(job_id: str, attempt: int) -> None:
        bind_job(job_id, attempt)
        log.info("working on %s with secret-llm-key-123", job_id)

        async def part(n: int) -> None:
            log.warning("part %d", n)

        await asyncio.gather(part(1), part(2))

    log.info("before any job")
    await asyncio.gather(asyncio.create_task(job("job-a", 1)), asyncio.create_task(job("job-b", 3)))
    log.info("after the jobs")

    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert records[0]["message"] == "before any job"
    assert "job_id" not in records[0] and "job_id" not in records[-1]
    by_job: dict[str, set[int]] = {}
    for record in records[1:-1]:
        by_job.setdefault(record["job_id"], set()).add(record["attempt"])
        assert {"ts", "level", "logger", "message"} <= set(record)
    assert by_job == {"job-a": {1}, "job-b": {3}}
    assert len(records) == 2 + 2 * 3
    assert "secret-llm-key-123" not in stream.getvalue()


def test_console_lines_name_the_job(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging(Settings(_env_file=None), stream=stream)  # type: ignore[call-arg]

    async def job() -> None:
        bind_job("job-c", 2)
        logging.getLogger("promptq.test").info("hello")

    asyncio.run(job())
    line = stream.getvalue().strip()
    assert line.endswith("promptq.test: hello [job=job-c attempt=2]")


@pytest.mark.parametrize("command", ["api", "worker", "up"])
def test_services_take_a_log_format(command: str) -> None:
    from tests.unit.cli_args import check_promptq_command

    for fmt in ("json", "console", "JSON"):
        check_promptq_command([command, "--log-format", fmt], "test")
    with pytest.raises(Exception, match="xml"):
        check_promptq_command([command, "--log-format", "xml"], "test")
