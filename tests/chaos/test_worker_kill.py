"""SIGKILL a worker again and again in the middle of a batch.

Given two `promptq worker` processes sharing ~300 jobs against a slow fake LLM, when one of
them is SIGKILLed mid-batch (three times, restarted each time), then every job succeeds with
its own answer exactly once, every attempt is on record, the killed attempts are recorded as
interrupted and not charged, and each of them runs again within 10 s of the kill (arq alone
would wait out its in-progress TTL: the job timeout + 10 s).
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

import pytest

from promptq import clock
from promptq.models import AttemptOutcome, JobAttempt, JobStatus
from promptq.schemas import PromptJobCreate
from promptq.service import JobService
from promptq.testing.fake_llm import FakeLLM, expected_reply
from tests.chaos.conftest import all_attempts, running_attempts, worker_name
from tests.conftest import wait_for, wait_terminal
from tests.e2e.conftest import Procs

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.parametrize("database_url", ["postgres"], indirect=True),
]

JOBS = 300
KILLS = 3
CONCURRENCY = "6"
#: From a kill to the orphan's next attempt: lease (4 s) + reconcile interval (3 s) + pick-up.
RESUME_WITHIN = timedelta(seconds=10)


@pytest.mark.timeout(90)
async def test_sigkilled_workers_jobs_resume_quickly_and_finish_exactly_once(
    chaos_service: JobService, chaos_procs: Procs, fake_llm: FakeLLM
) -> None:
    fake_llm.config.latency_ms, fake_llm.config.jitter = 400, 0.3
    contents = [f"chaos job {i}: write one line about the number {i}" for i in range(JOBS)]
    jobs = [
        (await chaos_service.submit(PromptJobCreate.model_validate(_body(c))))[0] for c in contents
    ]
    chaos_procs.start("worker", "--concurrency", CONCURRENCY, name="steady")
    victim = chaos_procs.start("worker", "--concurrency", CONCURRENCY, name="victim-0")

    kills: dict[str, datetime] = {}
    for round_ in range(KILLS):
        name = worker_name(victim)

        async def busy(name: str = name) -> bool:
            return await running_attempts(chaos_service, name) >= 3

        await wait_for(busy, timeout_s=20, interval_s=0.05)
        victim.kill()
        kills[name] = clock.now()
        victim.wait(timeout=10)
        victim = chaos_procs.start(
            "worker", "--concurrency", CONCURRENCY, name=f"victim-{round_ + 1}"
        )

    try:
        await wait_terminal(chaos_service.store, [j.id for j in jobs], timeout_s=60)
    except TimeoutError:
        print(chaos_procs.logs())
        raise

    attempts = await all_attempts(chaos_service)
    by_job: dict[str, list[JobAttempt]] = {}
    for attempt in sorted(attempts, key=lambda a: (a.job_id, a.number)):
        by_job.setdefault(attempt.job_id, []).append(attempt)

    for content, job in zip(contents, jobs, strict=True):
        row = await chaos_service.store.get_job(job.id)
        assert row is not None and row.status == JobStatus.SUCCEEDED, (content, row)
        assert row.result == expected_reply("fake-small", [{"role": "user", "content": content}])
        history = by_job[job.id]
        outcomes = Counter(a.outcome for a in history)
        assert [a.number for a in history] == list(range(1, row.attempts + 1))
        assert outcomes[AttemptOutcome.SUCCEEDED] == 1
        assert history[-1].outcome == AttemptOutcome.SUCCEEDED
        assert row.interruptions == outcomes[AttemptOutcome.INTERRUPTED]
        charged = len(history) - outcomes[AttemptOutcome.INTERRUPTED]
        assert row.attempts - row.interruptions == charged == 1

    # Each kill orphaned attempts, and each orphan ran again within RESUME_WITHIN.
    next_start = {(a.job_id, a.number): a.started_at for a in attempts}
    for name, killed_at in kills.items():
        orphans = [
            a for a in attempts if a.worker == name and a.outcome != AttemptOutcome.SUCCEEDED
        ]
        assert len(orphans) >= 3, f"killing {name} orphaned nothing"
        assert all(a.outcome == AttemptOutcome.INTERRUPTED for a in orphans)
        delays = {a.job_id: next_start[(a.job_id, a.number + 1)] - killed_at for a in orphans}
        late = {job_id: delay for job_id, delay in delays.items() if delay > RESUME_WITHIN}
        assert not late, f"orphans of {name} resumed late: {late}"
    results = [(await chaos_service.store.get_job(j.id)).result for j in jobs]  # type: ignore[union-attr]
    assert len(set(results)) == JOBS  # no answer landed on another job


def _body(content: str) -> dict[str, object]:
    return {"kind": "prompt", "messages": [{"role": "user", "content": content}]}
