"""`promptq retry` and `promptq worker --grace-s` as a user runs them.

Given failed jobs and a real `promptq worker` process, when `promptq retry` is run with ids or
with --status, then it prints what it re-queued and the jobs run again; bad arguments and jobs
that did not fail are reported with a non-zero exit code.
"""

from __future__ import annotations

import pytest

from promptq.models import JobStatus
from promptq.schemas import PromptJobCreate
from promptq.service import JobService
from tests.conftest import wait_terminal
from tests.e2e.conftest import Procs

pytestmark = pytest.mark.e2e


def prompt(content: str) -> PromptJobCreate:
    """A prompt job request."""
    return PromptJobCreate.model_validate(
        {"kind": "prompt", "messages": [{"role": "user", "content": content}]}
    )


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # SQL: see integration
async def test_retry_by_id_and_by_status(procs: Procs, service: JobService) -> None:
    first, _ = await service.submit(prompt("first [[fake: 400, ok]]"))
    second, _ = await service.submit(prompt("second [[fake: 401, ok]]"))
    fine, _ = await service.submit(prompt("fine"))
    ids = [first.id, second.id, fine.id]
    procs.start("worker", "--grace-s", "5", name="worker")
    await wait_terminal(service.store, ids)

    by_id = await procs.run("retry", first.id)
    assert by_id.returncode == 0, by_id.stderr + procs.logs()
    assert f"re-queued {first.id}" in by_id.stdout and "1 job(s) re-queued" in by_id.stdout
    await wait_terminal(service.store, ids)

    not_failed = await procs.run("retry", fine.id)
    assert not_failed.returncode == 1
    assert f"not re-queued {fine.id}" in " ".join(not_failed.stderr.split())

    by_status = await procs.run("retry", "--status", "failed")
    assert by_status.returncode == 0, by_status.stderr
    assert by_status.stdout.count("re-queued 0") == 1 and second.id in by_status.stdout
    await wait_terminal(service.store, ids)

    for job in (first, second):
        row = await service.store.get_job(job.id)
        assert row is not None and (row.status, row.attempts) == (JobStatus.SUCCEEDED, 2)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # no database involved
async def test_retry_refuses_bad_arguments(procs: Procs) -> None:
    neither = await procs.run("retry")
    assert neither.returncode == 2 and "job ids or --status" in neither.stderr

    both = await procs.run("retry", "00000000-0000-7000-8000-000000000000", "--status", "failed")
    assert both.returncode == 2

    wrong = await procs.run("retry", "--status", "succeeded")
    assert wrong.returncode == 2 and "failed, cancelled" in wrong.stderr
    assert "Traceback" not in wrong.stderr
