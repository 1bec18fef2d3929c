"""The README's plain-SQL reader, run as printed against a real SQLite database.

Given jobs that finished minutes ago and one that finished just now, when the README's reader
runs, then it returns the older ones in the order they finished and leaves the recent one for a
later run (a job stamped earlier may still be committing); re-run from its cursor, it returns
nothing it already returned, and the recent job once it is a minute old.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from promptq import clock
from promptq.models import AttemptOutcome, Job, JobStatus
from promptq.schemas import PromptJobCreate
from promptq.service import JobService
from promptq.store import AttemptResult, Claim

README = Path(__file__).resolve().parents[2] / "README.md"
pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def reader_snippet() -> str:
    """The Python block that follows "A reader that needs no API at all" in the README."""
    text = README.read_text(encoding="utf-8")
    after = text[text.index("A reader that needs no API at all") :]
    match = re.search(r"```python\n(.+?)\n```", after, re.DOTALL)
    assert match is not None
    return match.group(1)


def run_reader(db_path: str, since: tuple[str, str]) -> tuple[list[Any], tuple[str, str]]:
    """Run the snippet on `db_path` from cursor `since`; its rows and its new cursor."""
    code = reader_snippet()
    code = code.replace('sqlite3.connect(".promptq/promptq.db")', f"sqlite3.connect({db_path!r})")
    code = code.replace('since = ("", "")', f"since = {since!r}")
    namespace: dict[str, Any] = {}
    exec(compile(code, "README reader", "exec"), namespace)  # the README's own code
    namespace["db"].close()
    return namespace["rows"], namespace["since"]


async def finish_job(service: JobService, content: str, minutes_ago: float) -> str:
    """A job that succeeded `minutes_ago`."""
    request = PromptJobCreate.model_validate(
        {"kind": "prompt", "messages": [{"role": "user", "content": content}]}
    )
    job, _ = await service.submit(request)
    claim = await service.store.claim(job.id, worker="w", lease_s=60)
    assert isinstance(claim, Claim)
    done = AttemptResult(outcome=AttemptOutcome.SUCCEEDED, result=f"answer to {content}")
    assert await service.store.finish_attempt(claim, done, job_status=JobStatus.SUCCEEDED)
    finished_at = clock.now() - timedelta(minutes=minutes_ago)
    async with service.store.sessionmaker() as session, session.begin():
        await session.execute(update(Job).where(Job.id == job.id).values(finished_at=finished_at))
    return job.id


async def test_the_readme_reader_returns_settled_jobs_in_order_and_resumes(
    service: JobService, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given jobs finished 5 and 3 minutes ago, and one just now
    oldest = await finish_job(service, "first", 5)
    older = await finish_job(service, "second", 3)
    recent = await finish_job(service, "third", 0)
    db_path = database_url.removeprefix("sqlite+aiosqlite:///")

    # When the reader runs from the start
    rows, since = run_reader(db_path, ("", ""))

    # Then it returns the two settled jobs, oldest first, and its cursor is the last one's
    assert [row[0] for row in rows] == [oldest, older]
    assert [row[1] for row in rows] == ["succeeded", "succeeded"]
    assert since[1] == older
    assert "answer to first" in capsys.readouterr().out

    # And re-run from its cursor, it returns nothing again, until the recent job is a minute old
    assert run_reader(db_path, since)[0] == []
    async with service.store.sessionmaker() as session, session.begin():
        await session.execute(
            update(Job)
            .where(Job.id == recent)
            .values(finished_at=clock.now() - timedelta(seconds=61))
        )
    assert [row[0] for row in run_reader(db_path, since)[0]] == [recent]
