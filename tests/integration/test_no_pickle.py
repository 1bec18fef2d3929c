"""Nothing from Redis is ever unpickled: a pickled job payload is refused, not executed.

Given a job in the real Redis queue whose payload is a pickle that would create a file when
loaded, when a real worker takes it, then the file is never created, the poisoned entry is
dropped, and the worker goes on running ordinary jobs.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest
from arq.constants import job_key_prefix

from promptq.queue import RUN_JOB, deserialize
from promptq.schemas import PromptJobCreate
from promptq.service import JobService
from tests.conftest import WorkerFactory, wait_for, wait_terminal


class Booby:
    """Unpickling this creates `path`: the proof that a payload was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.path), "w")


def poisoned_payload(marker: Path) -> bytes:
    """An arq job definition, pickled, that calls open(marker, "w") when loaded."""
    return pickle.dumps({"t": 1, "f": RUN_JOB, "a": [Booby(marker)], "k": {}, "et": 0})


def test_the_job_deserializer_refuses_a_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    with pytest.raises(ValueError):
        deserialize(poisoned_payload(marker))
    assert not marker.exists()
    # The control: pickle itself would have run it
    pickle.loads(poisoned_payload(marker))
    assert marker.exists()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_pickled_job_in_redis_is_dropped_not_run(
    service: JobService, start_worker: WorkerFactory, tmp_path: Path
) -> None:
    # Given a pickled payload queued in Redis under a job id SQL has never heard of
    marker = tmp_path / "unpickled"
    redis = service.queue.redis
    job_id = "poisoned-job"
    await redis.set(job_key_prefix + job_id, poisoned_payload(marker))
    await redis.zadd(service.queue.queue_name, {job_id: int(time.time() * 1000)})

    # When a worker runs, next to an ordinary job
    await start_worker()
    ordinary, _ = await service.submit(
        PromptJobCreate.model_validate(
            {"kind": "prompt", "messages": [{"role": "user", "content": "after the poison"}]}
        )
    )
    await wait_terminal(service.store, [ordinary.id])

    # Then the poisoned entry is gone without ever being unpickled, and the worker went on
    async def dropped() -> bool:
        return await redis.zscore(service.queue.queue_name, job_id) is None

    await wait_for(dropped)
    assert not marker.exists()
    job = await service.store.get_job(ordinary.id)
    assert job is not None and job.status == "succeeded"
