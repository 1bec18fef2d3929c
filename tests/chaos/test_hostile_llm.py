"""A hostile model endpoint: rate limits, server errors, hangs, dropped connections, garbage.

Given two `promptq worker` processes sharing ~300 jobs, and a fake LLM that answers 30% of
requests with 429 (and a Retry-After), 10% with 500, and hangs past the client timeout,
drops the connection or sends a malformed body a few percent of the time each, then every
job ends in the right terminal state (succeeded with its own answer, or failed only after
max_attempts attempts with its last real error), each job made exactly as many model calls
as it has attempts on record, and no result is lost or duplicated. Bounded in time.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from promptq.models import AttemptOutcome, JobAttempt, JobStatus
from promptq.service import JobService
from promptq.settings import Settings
from promptq.testing.fake_llm import FakeLLM, expected_reply
from tests.chaos.conftest import all_attempts, all_jobs, wait_all_terminal
from tests.chaos.test_worker_kill import submit_all
from tests.e2e.conftest import Procs

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.parametrize("database_url", ["postgres"], indirect=True),
]

JOBS = 300
FAIL_RATES = {
    "429:retry_after=1": 0.30,
    "500": 0.10,
    "hang": 0.03,
    "drop": 0.03,
    "malformed": 0.03,
}


@pytest.mark.timeout(120)
async def test_every_job_ends_right_against_a_hostile_llm(
    chaos_settings: Settings, chaos_service: JobService, tmp_path: Path, fake_llm: FakeLLM
) -> None:
    fake_llm.config.latency_ms, fake_llm.config.jitter = 20, 0.5
    fake_llm.config.fail_rates = FAIL_RATES
    fake_llm.config.hang_s = 3.0  # well past the workers' 1 s timeout
    procs = Procs(chaos_settings.with_overrides(llm_timeout_s=1.0), tmp_path)
    contents = [f"hostile job {i}: one line about {i}" for i in range(JOBS)]
    jobs = await submit_all(chaos_service, contents)
    try:
        procs.start("worker", "--concurrency", "10", name="worker-a")
        procs.start("worker", "--concurrency", "10", name="worker-b")
        try:
            await wait_all_terminal(chaos_service, timeout_s=90)
        except TimeoutError:
            print(procs.logs())
            raise
    finally:
        procs.stop_all()

    rows = await all_jobs(chaos_service)
    by_job: dict[str, list[JobAttempt]] = {}
    for attempt in sorted(await all_attempts(chaos_service), key=lambda a: (a.job_id, a.number)):
        by_job.setdefault(attempt.job_id, []).append(attempt)
    asked = fake_llm.stats.requests_by_prompt
    statuses: Counter[str] = Counter()
    for content, job in zip(contents, jobs, strict=True):
        row, history = rows[job.id], by_job[job.id]
        statuses[row.status] += 1
        assert [a.number for a in history] == list(range(1, row.attempts + 1)), content
        assert row.interruptions == 0
        assert asked[content] == row.attempts == len(history), content
        outcomes = Counter(a.outcome for a in history)
        assert outcomes[AttemptOutcome.RUNNING] == 0
        if row.status == JobStatus.SUCCEEDED:
            assert outcomes[AttemptOutcome.SUCCEEDED] == 1 and history[-1].outcome == "succeeded"
            assert row.result == expected_reply(
                "fake-small", [{"role": "user", "content": content}]
            )
            assert row.error is None
        else:
            assert row.status == JobStatus.FAILED, (content, row.status)
            assert row.attempts == row.max_attempts, content
            assert outcomes[AttemptOutcome.TRANSIENT_ERROR] == row.attempts
            assert row.result is None
            assert row.error == history[-1].error and row.error, content
    assert statuses[JobStatus.SUCCEEDED] >= JOBS * 0.8, statuses
    # Every failure kind really happened.
    by_status = fake_llm.stats.responses_by_status
    assert by_status.get(429) and by_status.get(500) and by_status.get(0), by_status
    results = [r.result for r in rows.values() if r.result is not None]
    assert len(results) == len(set(results)) == statuses[JobStatus.SUCCEEDED]
