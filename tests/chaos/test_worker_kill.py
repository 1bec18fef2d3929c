"""SIGKILL a worker again and again in the middle of a batch, at the shipped lease settings.

Given two `promptq worker` processes sharing a batch (~300 jobs against a slow fake LLM, or
the issue's 2,000 against a quick one), when one of them is SIGKILLed mid-batch (and
restarted each time), then every job succeeds with its own answer exactly once, every attempt
is on record, the killed attempts are recorded as interrupted and not charged, and each of
them runs again within 10 s of the kill with the DEFAULT lease and reconcile interval (arq
alone would wait out its in-progress TTL: the job timeout + 10 s).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest

from promptq import clock
from promptq.models import AttemptOutcome, Job, JobAttempt, JobStatus
from promptq.schemas import PromptJobCreate
from promptq.service import JobService
from promptq.settings import Settings
from promptq.testing.fake_llm import FakeLLM, expected_reply
from tests.chaos.conftest import (
    all_attempts,
    all_jobs,
    running_attempts,
    wait_all_terminal,
    worker_name,
)
from tests.conftest import wait_for
from tests.e2e.conftest import Procs

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.parametrize("database_url", ["postgres"], indirect=True),
]

#: From a kill to the orphan's next attempt, at the defaults: the lease (6 s, renewed every
#: 2 s, so it runs out 4-6 s after the kill) + the reconcile interval (2 s) + a pick-up.
RESUME_WITHIN = timedelta(seconds=10)


@dataclass(frozen=True)
class Batch:
    jobs: int
    kills: int
    concurrency: int
    latency_ms: float
    #: Bound on finishing the batch after the last kill.
    finish_s: float


BATCHES = {
    "300-jobs-3-kills": Batch(jobs=300, kills=3, concurrency=6, latency_ms=400, finish_s=60),
    "2000-jobs-2-kills": Batch(jobs=2000, kills=2, concurrency=25, latency_ms=60, finish_s=150),
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("batch", list(BATCHES.values()), ids=list(BATCHES))
async def test_sigkilled_workers_jobs_resume_within_10s_and_finish_exactly_once(
    batch: Batch,
    chaos_settings: Settings,
    chaos_service: JobService,
    chaos_procs: Procs,
    fake_llm: FakeLLM,
) -> None:
    defaults = Settings.model_fields
    assert chaos_settings.lease_s == defaults["lease_s"].default
    assert chaos_settings.reconcile_interval_s == defaults["reconcile_interval_s"].default
    fake_llm.config.latency_ms, fake_llm.config.jitter = batch.latency_ms, 0.3
    contents = [f"chaos job {i}: write one line about the number {i}" for i in range(batch.jobs)]
    jobs = await submit_all(chaos_service, contents)
    concurrency = str(batch.concurrency)
    chaos_procs.start("worker", "--concurrency", concurrency, name="steady")
    victim = chaos_procs.start("worker", "--concurrency", concurrency, name="victim-0")

    kills: dict[str, datetime] = {}
    for round_ in range(batch.kills):
        name = worker_name(victim)

        async def busy(name: str = name) -> bool:
            return await running_attempts(chaos_service, name) >= 3

        await wait_for(busy, timeout_s=30, interval_s=0.05)
        victim.kill()
        kills[name] = clock.now()
        await asyncio.to_thread(victim.wait, 10)
        victim = chaos_procs.start(
            "worker", "--concurrency", concurrency, name=f"victim-{round_ + 1}"
        )

    try:
        await wait_all_terminal(chaos_service, timeout_s=batch.finish_s)
    except TimeoutError:
        print(chaos_procs.logs())
        raise

    rows = await all_jobs(chaos_service)
    attempts = await all_attempts(chaos_service)
    by_job: dict[str, list[JobAttempt]] = {}
    for attempt in sorted(attempts, key=lambda a: (a.job_id, a.number)):
        by_job.setdefault(attempt.job_id, []).append(attempt)

    assert len(rows) == batch.jobs
    for content, job in zip(contents, jobs, strict=True):
        row = rows[job.id]
        assert row.status == JobStatus.SUCCEEDED, (content, row)
        assert row.result == expected_reply("fake-small", [{"role": "user", "content": content}])
        history = by_job[job.id]
        outcomes = Counter(a.outcome for a in history)
        assert [a.number for a in history] == list(range(1, row.attempts + 1))
        assert outcomes[AttemptOutcome.SUCCEEDED] == 1
        assert history[-1].outcome == AttemptOutcome.SUCCEEDED
        assert row.interruptions == outcomes[AttemptOutcome.INTERRUPTED]
        charged = len(history) - outcomes[AttemptOutcome.INTERRUPTED]
        assert row.attempts - row.interruptions == charged == 1
    # Every model call is on record as an attempt; only killed attempts were repeated (a killed
    # attempt may have died before its call went out).
    asked = fake_llm.stats.requests_by_prompt
    for content, job in zip(contents, jobs, strict=True):
        assert 1 <= asked.get(content, 0) <= len(by_job[job.id]), content

    # Each kill orphaned attempts, and each orphan ran again within RESUME_WITHIN of the last
    # kill before that (the next victim may die holding an orphan it has not claimed yet).
    next_start = {(a.job_id, a.number): a.started_at for a in attempts}

    def last_kill_before(when: datetime) -> datetime:
        return max(k for k in kills.values() if k <= when)

    for name in kills:
        orphans = [
            a for a in attempts if a.worker == name and a.outcome != AttemptOutcome.SUCCEEDED
        ]
        assert len(orphans) >= 3, f"killing {name} orphaned nothing"
        assert all(a.outcome == AttemptOutcome.INTERRUPTED for a in orphans)
        resumed = {a.job_id: next_start[(a.job_id, a.number + 1)] for a in orphans}
        delays = {job_id: at - last_kill_before(at) for job_id, at in resumed.items()}
        late = {job_id: delay for job_id, delay in delays.items() if delay > RESUME_WITHIN}
        assert not late, f"orphans of {name} resumed late: {late}"
    assert len({row.result for row in rows.values()}) == batch.jobs  # no answer on another job


async def submit_all(service: JobService, contents: list[str]) -> list[Job]:
    """Submit one prompt job per content, 20 at a time, in order."""
    jobs: list[Job] = []
    for start in range(0, len(contents), 20):
        chunk = contents[start : start + 20]
        created = await asyncio.gather(*(service.submit(_request(c)) for c in chunk))
        jobs += [job for job, _ in created]
    return jobs


def _request(content: str) -> PromptJobCreate:
    return PromptJobCreate.model_validate(
        {"kind": "prompt", "messages": [{"role": "user", "content": content}]}
    )
