"""Summarizing long documents on real Redis and a real database (SQLite and PostgreSQL), with
the fake LLM tokenizing like a real model (4 characters per token).

Given documents too long for one call, when a worker runs their summarize jobs, then every chunk
is summarized by exactly one successful map call, summaries are reduced level by level within
the depth cap, finished chunks survive failures, crashes and truncation, and nothing the model
read only in part is ever kept.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, cast

import pytest
from sqlalchemy import update

from promptq.checkpoints import ChunkKey
from promptq.chunking import text_hash
from promptq.errors import ClaimLost
from promptq.models import AttemptOutcome, ChunkStatus, Job, JobChunk, JobStatus
from promptq.schemas import SummarizeJobCreate
from promptq.service import JobService
from promptq.settings import Settings
from promptq.store import DEADLINE_EXCEEDED, AttemptResult, Claim
from promptq.testing.fake_llm import FakeLLM, expected_reply
from tests.conftest import WorkerFactory, wait_for, wait_terminal
from tests.summaries import generate_document, requests_by_text
from worker.context import WorkerContext
from worker.leases import LeaseKeeper
from worker.prompts import DIVIDER, SummaryRequest, single_messages
from worker.summarize import run_while_held

MAP_PREFIX = "Below is part "


@pytest.fixture(autouse=True)
def realistic_tokenizer(fake_llm: FakeLLM) -> None:
    """The fake counts 4 characters per token, as promptq's estimate assumes."""
    fake_llm.config.chars_per_token = 4.0


def summarize(document: str, **extra: Any) -> SummarizeJobCreate:
    """A summarize job request."""
    return SummarizeJobCreate.model_validate({"kind": "summarize", "document": document, **extra})


async def run_to_end(
    service: JobService,
    start_worker: WorkerFactory,
    request: SummarizeJobCreate,
    *,
    timeout_s: float = 60.0,
    **worker_overrides: Any,
) -> Job:
    """Submit one job, run a worker until it ends, and return the finished row."""
    job, _ = await service.submit(request)
    await start_worker(**worker_overrides)
    await wait_terminal(service.store, [job.id], timeout_s=timeout_s)
    await wait_settled(service)
    finished = await service.store.get_job(job.id)
    assert finished is not None
    return finished


async def wait_settled(service: JobService) -> None:
    """Wait until arq has finished its bookkeeping of every job (the queue is empty), so the
    test never stops a worker in the middle of it."""

    async def empty() -> bool:
        return not await service.queue.redis.zcard(service.queue.queue_name)

    await wait_for(empty)


def current(rows: list[JobChunk]) -> list[JobChunk]:
    """The rows of the job's final plan (superseded and truncated ones left out)."""
    return [r for r in rows if r.status not in (ChunkStatus.SUPERSEDED, ChunkStatus.TRUNCATED)]


def map_prompts(fake: FakeLLM) -> dict[str, int]:
    """Map prompts the fake received, with how often each was sent."""
    return {p: n for p, n in fake.stats.requests_by_prompt.items() if p.startswith(MAP_PREFIX)}


async def test_a_200_page_document_is_mapped_once_per_chunk_and_reduced_in_a_bounded_tree(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM, settings: Settings
) -> None:
    # Given ~100k words (about 200 pages) and a 2048-token window: over a hundred chunks
    document = generate_document(100_000)
    request = summarize(document, context_window=2048, instructions="Three bullets.")

    # When a worker summarizes it
    job = await run_to_end(service, start_worker, request)

    # Then it succeeded, and every chunk got exactly one map call
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.attempts == 1
    rows = await service.checkpoints.list_chunks(job.id)
    assert all(r.status == ChunkStatus.DONE and r.attempts == 1 for r in rows)
    by_level: dict[int, list[JobChunk]] = {}
    for row in rows:
        by_level.setdefault(row.level, []).append(row)
    chunks = by_level[0]
    assert len(chunks) >= 100
    maps = map_prompts(fake_llm)
    assert len(maps) == len(chunks) and set(maps.values()) == {1}
    sent = requests_by_text(fake_llm)
    assert all(sent[r.text_hash] == 1 for r in rows)

    # And the reduce tree has more than one level, shrinks at each, and stays under the cap
    levels = sorted(by_level)
    assert levels == list(range(len(levels)))
    assert 2 <= levels[-1] <= settings.summary_max_depth
    sizes = [len(by_level[level]) for level in levels]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 1
    assert all(smaller < larger for larger, smaller in itertools.pairwise(sizes))
    assert fake_llm.stats.total_requests == len(rows)

    # And no prompt went over the window, and the job's usage adds up every call
    assert all(r.prompt_tokens is not None and r.prompt_tokens <= 2048 for r in rows)
    assert job.prompt_tokens == sum(r.prompt_tokens or 0 for r in rows)
    assert job.prompt_tokens == fake_llm.stats.prompt_tokens_total
    assert job.completion_tokens == fake_llm.stats.completion_tokens_total
    assert job.result == by_level[levels[-1]][0].summary
    assert job.result is not None and job.result.startswith("[fake-small] reply")
    (shown,) = await service.describe([job])
    assert shown.progress is not None
    assert shown.progress.model_dump() == {
        "chunks_done": 1,
        "chunks_total": 1,
        "level": levels[-1],
    }


async def test_a_short_document_is_still_one_call(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a document that fits the window
    request = summarize("The lighthouse was built in 1871. " * 40, style="bullets")

    # When it is summarized
    job = await run_to_end(service, start_worker, request)

    # Then one call did it, with today's prompt shape, and one checkpoint row records it
    assert job.status == JobStatus.SUCCEEDED
    messages = single_messages(SummaryRequest.from_input(request.job_input()), request.document)
    assert job.result == expected_reply("fake-small", messages)
    assert fake_llm.stats.total_requests == 1
    (row,) = await service.checkpoints.list_chunks(job.id)
    assert (row.level, row.chunk_index, row.status, row.summary) == (0, 0, "done", job.result)
    assert messages[1]["content"].startswith("Summarize the following document. Format")


async def test_a_failed_chunk_is_retried_alone_and_finished_chunks_are_not_requested_again(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a long document in which one paragraph makes the model fail once with a 500
    paragraphs = generate_document(8_000, seed=3).split("\n\n")
    middle = len(paragraphs) * 2 // 3
    paragraphs[middle] = paragraphs[middle].replace(". ", ". [[fake: 500, ok]] ", 1)
    request = summarize("\n\n".join(paragraphs), context_window=2048)

    # When a worker summarizes it
    job = await run_to_end(service, start_worker, request, summary_fanout=2)

    # Then the job needed two attempts, the first failing transiently on that chunk
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.attempts == 2
    first, second = await service.store.list_attempts(job.id)
    assert (first.outcome, first.status_code) == (AttemptOutcome.TRANSIENT_ERROR, 500)
    assert first.error is not None and "saved for the next attempt" in first.error
    assert second.outcome == AttemptOutcome.SUCCEEDED

    # And only the scripted chunk was requested twice: every other call happened once
    rows = await service.checkpoints.list_chunks(job.id)
    maps = map_prompts(fake_llm)
    scripted = {text_hash(p.partition(DIVIDER)[2]) for p in maps if "[[fake:" in p}
    assert scripted
    assert len(maps) == sum(r.level == 0 for r in rows)
    sent = requests_by_text(fake_llm)
    for row in rows:
        expected = 2 if row.text_hash in scripted else 1
        assert (row.status, row.attempts, sent[row.text_hash]) == ("done", expected, expected)
    # And the first attempt had finished chunks that the second reused
    assert sum(r.level == 0 for r in rows) > len(scripted) + 1


async def test_a_deadline_stops_a_summarize_job_between_and_during_calls(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a worker, a model that takes 0.5 s per call, and a long document with 2 s to live
    await start_worker(summary_fanout=2)
    fake_llm.config.latency_ms = 500
    request = summarize(generate_document(20_000, seed=9), context_window=2048, deadline_s=2)

    # When it is summarized
    job, _ = await service.submit(request)
    await wait_terminal(service.store, [job.id], timeout_s=15)

    # Then it failed on its deadline within the first attempt, instead of being retried
    row = await service.store.get_job(job.id)
    assert row is not None and row.status == JobStatus.FAILED
    assert row.error_code == DEADLINE_EXCEEDED and row.error is not None
    assert "deadline_s of 2 s" in row.error and "saved for the next attempt" in row.error
    (attempt,) = await service.store.list_attempts(job.id)
    assert attempt.latency_ms is not None and attempt.latency_ms < 3000

    # And the calls stopped with it: most chunks were never requested
    chunks = [r for r in await service.checkpoints.list_chunks(job.id) if r.level == 0]
    assert fake_llm.stats.total_requests < len(chunks)
    assert sum(r.attempts for r in chunks) == fake_llm.stats.total_requests


async def test_a_worker_stopped_mid_job_resumes_without_redoing_finished_chunks(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a long summarize job, slow enough to stop halfway
    fake_llm.config.latency_ms = 20
    job, _ = await service.submit(summarize(generate_document(12_000, seed=5), context_window=2048))
    worker = await start_worker(summary_fanout=2)

    async def some_chunks_done() -> bool:
        return sum(r.status == "done" for r in await service.checkpoints.list_chunks(job.id)) >= 6

    await wait_for(some_chunks_done)

    # When the worker is stopped in the middle of the map, then a new one takes over
    await worker.close()
    finished_before = {
        r.text_hash for r in await service.checkpoints.list_chunks(job.id) if r.status == "done"
    }
    stopped = await service.store.get_job(job.id)
    assert stopped is not None and stopped.status == JobStatus.QUEUED
    await service.queue.enqueue(job.id)
    await start_worker(summary_fanout=2)
    await wait_terminal(service.store, [job.id], timeout_s=60)
    await wait_settled(service)

    # Then it finished, the lost attempt is recorded as interrupted, and no chunk finished
    # before the stop was requested again
    done = await service.store.get_job(job.id)
    assert done is not None and done.status == JobStatus.SUCCEEDED, done.error
    outcomes = [a.outcome for a in await service.store.list_attempts(job.id)]
    assert outcomes == [AttemptOutcome.INTERRUPTED, AttemptOutcome.SUCCEEDED]
    sent = requests_by_text(fake_llm)
    assert len(finished_before) >= 6
    assert all(sent[digest] == 1 for digest in finished_before)
    rows = current(await service.checkpoints.list_chunks(job.id))
    assert all(r.status == ChunkStatus.DONE for r in rows)


async def test_silent_truncation_shrinks_the_chunks_and_is_never_kept(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a model that reads at most 1500 prompt tokens but answers 200 to longer prompts,
    # and a job that believes the window is 3000 tokens
    fake_llm.config.context_window_tokens = 1500
    request = summarize(generate_document(6_000, seed=11), context_window=3000)

    # When a worker summarizes it
    job = await run_to_end(service, start_worker, request)

    # Then the first attempt failed as truncated, and the second succeeded with smaller chunks
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.attempts == 2
    first, second = await service.store.list_attempts(job.id)
    assert first.outcome == AttemptOutcome.TRANSIENT_ERROR
    assert first.error is not None and "silently cut the prompt" in first.error
    assert "chunks 50% as large" in first.error
    assert second.outcome == AttemptOutcome.SUCCEEDED
    assert job.chunk_scale == pytest.approx(0.5)
    assert fake_llm.stats.truncated_requests >= 1

    # And every truncated answer was thrown away, and every kept one was read in full
    rows = await service.checkpoints.list_chunks(job.id)
    truncated = [r for r in rows if r.status == ChunkStatus.TRUNCATED]
    assert truncated and all(r.summary is None and r.prompt_tokens == 1500 for r in truncated)
    kept = [r for r in rows if r.summary is not None]
    assert kept and all(r.prompt_tokens is not None and r.prompt_tokens < 1500 for r in kept)
    first_plan = {r.text_hash for r in rows if r.level == 0 and r.status != ChunkStatus.DONE}
    final_plan = [r for r in current(rows) if r.level == 0]
    assert len(final_plan) > len(first_plan) >= 2
    assert {r.text_hash for r in final_plan}.isdisjoint(first_plan)


async def test_a_retry_after_the_model_window_was_raised_cuts_full_size_chunks_again(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a job that failed on its one attempt because the model silently cut its prompts
    fake_llm.config.context_window_tokens = 1500
    request = summarize(generate_document(6_000, seed=11), context_window=3000, max_attempts=1)
    failed = await run_to_end(service, start_worker, request)
    assert failed.status == JobStatus.FAILED and failed.chunk_scale == pytest.approx(0.5)
    first_plan = {r.text_hash for r in await service.checkpoints.list_chunks(failed.id)}

    # When the operator raises the model's window, and retries the job
    fake_llm.config.context_window_tokens = None
    retried = await service.retry_one(failed.id)

    # Then the retry starts from full-size chunks again (those of the first plan), and succeeds
    assert retried.chunk_scale == pytest.approx(1.0)
    await wait_terminal(service.store, [failed.id], timeout_s=60)
    await wait_settled(service)
    done = await service.store.get_job(failed.id)
    assert done is not None and done.status == JobStatus.SUCCEEDED, done and done.error
    level_0 = {
        r.text_hash for r in current(await service.checkpoints.list_chunks(done.id)) if r.level == 0
    }
    assert level_0 <= first_plan


async def test_a_failed_job_reports_the_usage_of_the_calls_it_made(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a long document one of whose parts the model refuses for good (a 403)
    paragraphs = generate_document(6_000, seed=5).split("\n\n")
    middle = len(paragraphs) // 2
    paragraphs[middle] += " [[fake: 403]]"
    request = summarize("\n\n".join(paragraphs), context_window=3000)

    # When a worker runs it
    job = await run_to_end(service, start_worker, request)

    # Then it failed, and its usage is every token the model reported for the other parts
    assert job.status == JobStatus.FAILED and job.error is not None and "403" in job.error
    stats = fake_llm.stats
    assert stats.prompt_tokens_total > 0
    assert (job.prompt_tokens, job.completion_tokens) == (
        stats.prompt_tokens_total,
        stats.completion_tokens_total,
    )


async def test_a_context_length_error_shrinks_the_chunks_instead_of_failing_the_job(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a model that refuses the first prompt as too long for its context (a 400)
    request = summarize("The ferry timetable changed twice. [[fake: context, ok]]")

    # When a worker summarizes it
    job = await run_to_end(service, start_worker, request)

    # Then the 400 counted as truncation, not as a permanent failure: smaller chunks next time
    assert job.status == JobStatus.SUCCEEDED, job.error
    first, _ = await service.store.list_attempts(job.id)
    assert (first.outcome, first.status_code) == (AttemptOutcome.TRANSIENT_ERROR, 400)
    assert first.error is not None and "maximum context length" in first.error
    assert job.chunk_scale == pytest.approx(0.5)


async def test_a_document_that_needs_more_levels_than_allowed_fails_clearly(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a document whose summaries need two reduce levels, and a cap of one
    request = summarize(generate_document(10_000, seed=2), context_window=1024)

    # When a worker tries
    job = await run_to_end(service, start_worker, request, summary_max_depth=1)

    # Then it fails at once, permanently, saying what to change; the map work is saved
    assert job.status == JobStatus.FAILED
    assert job.attempts == 1
    assert job.error_code == "summary_failed"
    assert job.error is not None and "PROMPTQ_SUMMARY_MAX_DEPTH" in job.error
    rows = await service.checkpoints.list_chunks(job.id)
    assert rows and all(r.level == 0 and r.status == ChunkStatus.DONE for r in rows)


async def test_progress_is_visible_and_parallel_calls_are_bounded_by_the_fanout(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a slow model and a job of many chunks
    fake_llm.config.latency_ms = 15
    job, _ = await service.submit(summarize(generate_document(6_000, seed=4), context_window=1024))
    (queued,) = await service.describe([job])
    assert queued.progress is not None and queued.progress.chunks_total == 0

    # When a worker with a fan-out of 3 runs it
    await start_worker(summary_fanout=3)

    # Then progress climbs at level 0 while the map runs
    async def mid_map() -> bool:
        row = await service.store.get_job(job.id)
        assert row is not None
        (shown,) = await service.describe([row])
        assert shown.progress is not None
        p = shown.progress
        return p.level == 0 and 0 < p.chunks_done < p.chunks_total

    await wait_for(mid_map)
    await wait_terminal(service.store, [job.id], timeout_s=60)
    await wait_settled(service)

    # And the model never saw more than 3 of its calls at once, but did see several
    done = await service.store.get_job(job.id)
    assert done is not None and done.status == JobStatus.SUCCEEDED
    assert 1 < fake_llm.stats.peak_in_flight <= 3


async def test_the_final_summary_can_be_streamed_from_the_model(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM
) -> None:
    # Given a model whose streamed answer breaks off the first time
    request = summarize("Streaming keeps readers busy. [[fake: stream_drop, ok]] " * 3)

    # When a worker runs the job (it streams final summaries)
    job = await run_to_end(service, start_worker, request)

    # Then the broken stream was a transient failure and the retry's full answer is kept
    assert job.status == JobStatus.SUCCEEDED
    assert job.attempts == 2
    messages = single_messages(SummaryRequest.from_input(request.job_input()), request.document)
    assert job.result == expected_reply("fake-small", messages)
    assert job.finish_reason == "stop"
    assert job.prompt_tokens and job.completion_tokens


async def test_chunk_checkpoint_writes_are_idempotent(service: JobService) -> None:
    # Given a claimed summarize job with a planned level
    job, _ = await service.submit(summarize("x " * 10))
    claim = await service.store.claim(job.id, worker="test", lease_s=30)
    assert isinstance(claim, Claim)
    assert await service.checkpoints.plan(claim, 0, ["a" * 64, "b" * 64]) == {}
    key = ChunkKey(job.id, 0, 0, "a" * 64)

    # When a call finishes twice (two deliveries of the same job), then only the first counts
    assert await service.checkpoints.start(key)
    assert await service.checkpoints.finish(key, "first", prompt_tokens=5, completion_tokens=2)
    assert not await service.checkpoints.finish(key, "again", prompt_tokens=5, completion_tokens=2)
    assert not await service.checkpoints.start(key)

    # And planning the level again reuses the summary instead of asking for it
    again = await service.checkpoints.plan(claim, 0, ["a" * 64, "b" * 64])
    assert [(i, s.summary) for i, s in again.items()] == [(0, "first")]
    rows = await service.checkpoints.list_chunks(job.id)
    assert [(r.chunk_index, r.status, r.attempts) for r in rows] == [
        (0, "done", 1),
        (1, "pending", 0),
    ]

    # And a plan with other chunks supersedes the rows it no longer names
    await service.checkpoints.plan(claim, 0, ["c" * 64])
    progress = (await service.checkpoints.progress([job.id]))[job.id]
    assert progress.model_dump() == {"chunks_done": 0, "chunks_total": 1, "level": 0}

    # And once the claim is gone (the job was taken over), planning is refused
    await service.store.finish_attempt(
        claim, AttemptResult(outcome=AttemptOutcome.INTERRUPTED), job_status=JobStatus.QUEUED
    )
    with pytest.raises(ClaimLost):
        await service.checkpoints.plan(claim, 0, ["c" * 64])


async def test_a_long_attempt_keeps_its_lease_and_stops_once_the_job_is_taken_from_it(
    service: JobService, settings: Settings
) -> None:
    # Given a claimed summarize job whose lease lasts 0.3 s, held by the worker's lease keeper
    job, _ = await service.submit(summarize("x " * 10))
    claim = await service.store.claim(job.id, worker="test", lease_s=0.3)
    assert isinstance(claim, Claim)
    leases = LeaseKeeper(service.store, lease_s=0.3)
    leases.hold(claim)
    leases.start()
    ctx = cast(
        WorkerContext, {"checkpoints": service.checkpoints, "leases": leases, "settings": settings}
    )
    first_lease = (await service.store.get_job(job.id)).lease_expires_at  # type: ignore[union-attr]
    try:
        # When work outlasts the lease several times over, then the lease keeps moving forward
        await run_while_held(ctx, claim, asyncio.sleep(0.8))
        renewed = await service.store.get_job(job.id)
        assert renewed is not None and renewed.lease_expires_at > first_lease
        assert renewed.status == JobStatus.RUNNING

        # And when the job is cancelled meanwhile, the work is stopped with ClaimLost
        async with service.store.sessionmaker() as session, session.begin():
            await session.execute(
                update(Job).where(Job.id == job.id).values(status=JobStatus.CANCELLED)
            )
        stopped = asyncio.Event()

        async def forever() -> None:
            try:
                await asyncio.sleep(30)
            finally:
                stopped.set()

        async with asyncio.timeout(5):
            with pytest.raises(ClaimLost):
                await run_while_held(ctx, claim, forever())
        assert stopped.is_set()

        # And an attempt the keeper no longer holds is lost from the start
        leases.release(claim)
        with pytest.raises(ClaimLost):
            await run_while_held(ctx, claim, forever())
    finally:
        await leases.stop()
