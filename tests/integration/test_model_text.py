"""Model output that a database will not store, on real Redis and a real database (SQLite and
PostgreSQL).

Given a model whose answer holds a NUL character (valid JSON, `\\u0000`, which PostgreSQL's text
type refuses), when a worker runs prompt and summarize jobs against it, then each job succeeds
and keeps the answer with U+FFFD in the NUL's place. And an answer the database refuses anyway
(here a trigger refuses it) fails its attempts, charged, so the job ends: it never runs forever.
"""

from __future__ import annotations

from sqlalchemy import text

from promptq.models import AttemptOutcome, ChunkStatus, JobStatus
from promptq.schemas import PromptJobCreate, SummarizeJobCreate
from promptq.service import JobService
from promptq.testing.fake_llm import FakeLLM
from tests.conftest import WorkerFactory, wait_terminal
from tests.summaries import generate_document

NUL_REPLY = "[[fake: nul]]"


async def test_a_prompt_answer_with_a_nul_is_stored_with_a_replacement_character(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a prompt whose answer holds a NUL
    request = PromptJobCreate.model_validate(
        {"kind": "prompt", "messages": [{"role": "user", "content": f"say it {NUL_REPLY}"}]}
    )
    job, _ = await service.submit(request)

    # When a worker runs it
    await start_worker()
    await wait_terminal(service.store, [job.id])

    # Then it succeeded on its one attempt, with the NUL replaced
    done = await service.store.get_job(job.id)
    assert done is not None and done.status == JobStatus.SUCCEEDED, done and done.error
    assert done.attempts == 1 and fake_llm.stats.total_requests == 1
    assert done.result is not None and "\ufffd" in done.result and "\x00" not in done.result


async def test_a_map_summary_with_a_nul_is_kept_with_a_replacement_character(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a document long enough to be mapped, whose first part's summary holds a NUL
    fake_llm.config.chars_per_token = 4.0
    document = f"{NUL_REPLY} " + generate_document(3000)
    request = SummarizeJobCreate.model_validate(
        {"kind": "summarize", "document": document, "context_window": 2048}
    )
    job, _ = await service.submit(request)

    # When a worker runs it
    await start_worker()
    await wait_terminal(service.store, [job.id], timeout_s=60)

    # Then it succeeded on its one attempt, and the first part's stored summary has U+FFFD
    done = await service.store.get_job(job.id)
    assert done is not None and done.status == JobStatus.SUCCEEDED, done and done.error
    assert done.attempts == 1
    chunks = await service.checkpoints.list_chunks(job.id)
    assert len(chunks) > 2 and all(c.status == ChunkStatus.DONE for c in chunks)
    first = min((c for c in chunks if c.level == 0), key=lambda c: c.chunk_index)
    assert first.summary is not None and "\ufffd" in first.summary
    assert not any("\x00" in (c.summary or "") for c in chunks)


#: A trigger that refuses any answer containing "poison", for each database.
REFUSE_POISON = {
    "sqlite": [
        """CREATE TRIGGER refuse_poison BEFORE UPDATE OF result ON jobs
        WHEN NEW.result LIKE '%poison%' BEGIN SELECT RAISE(ABORT, 'poisoned answer'); END"""
    ],
    "postgresql": [
        """CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.result LIKE '%poison%' THEN RAISE EXCEPTION 'poisoned answer'; END IF;
            RETURN NEW;
        END $$""",
        """CREATE TRIGGER refuse_poison BEFORE UPDATE ON jobs
        FOR EACH ROW EXECUTE FUNCTION refuse_poison()""",
    ],
}


async def test_an_answer_the_database_refuses_fails_its_attempts_and_the_job_ends(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a database that refuses answers containing "poison", and a job whose answer does
    async with service.store.sessionmaker() as session, session.begin():
        for statement in REFUSE_POISON[session.bind.dialect.name]:
            await session.execute(text(statement))
    request = PromptJobCreate.model_validate(
        {
            "kind": "prompt",
            "messages": [{"role": "user", "content": "say poison"}],
            "max_attempts": 2,
        }
    )
    job, _ = await service.submit(request)

    # When a worker runs it
    await start_worker()
    await wait_terminal(service.store, [job.id])

    # Then both attempts failed, charged, saying why, and the model was called once per attempt
    done = await service.store.get_job(job.id)
    assert done is not None and done.status == JobStatus.FAILED
    assert done.error is not None and "the database refused the model's answer" in done.error
    assert "poisoned answer" in done.error
    attempts = await service.store.list_attempts(job.id)
    assert [a.outcome for a in attempts] == [AttemptOutcome.TRANSIENT_ERROR] * 2
    assert fake_llm.stats.total_requests == 2
