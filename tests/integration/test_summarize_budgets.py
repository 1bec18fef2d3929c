"""Output budgets of summarize jobs, on the real fake LLM (over HTTP), real Redis and a real
database, with the fake behind a gate that refuses what vLLM and OpenAI refuse: a request whose
prompt plus max_tokens exceeds the model's window (a 400 "maximum context length").

Given a user's `params.max_tokens` of any size, the final (or only) call is sent it unchanged
and its prompt is budgeted around it, so no call is refused; map and combine calls have their
own cap, and ask for words that fit it; an intermediate answer cut off at its cap is never kept;
and an overflow at a reduce level does not throw away the map summaries.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from promptq.chunking import MIN_SUMMARY_TOKENS, TOKENS_PER_WORD, text_hash
from promptq.models import AttemptOutcome, ChunkStatus, JobChunk, JobStatus
from promptq.service import JobService
from promptq.testing.fake_llm import FakeLLM, expected_reply
from tests.conftest import WorkerFactory
from tests.integration.test_summarize import MAP_PREFIX, map_prompts, run_to_end, summarize
from tests.summaries import generate_document
from worker.prompts import DIVIDER

FINAL_PREFIX = "The text below consists of summaries"
COMBINE_PREFIX = "Below are summaries of consecutive parts"
WORDS_ASKED = re.compile(r"at most (\d+) words")


@dataclass
class Sent:
    """One chat request as the gate saw it."""

    prompt: str
    prompt_tokens: int
    max_tokens: int | None
    refused: bool

    @property
    def kind(self) -> str:
        for prefix, kind in ((MAP_PREFIX, "map"), (COMBINE_PREFIX, "combine")):
            if self.prompt.startswith(prefix):
                return kind
        return "final" if self.prompt.startswith(FINAL_PREFIX) else "single"


@dataclass
class Gate:
    """What the model endpoint enforces, and every request it saw."""

    #: Refuse prompt + max_tokens above this, as vLLM and OpenAI do (None: no check).
    window: int | None = None
    #: Refuse this many final calls first, as too long for the context (a scripted overflow).
    refuse_finals: int = 0
    sent: list[Sent] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[Sent]:
        return [s for s in self.sent if s.kind == kind]

    @property
    def refused(self) -> list[Sent]:
        return [s for s in self.sent if s.refused]


def _refusal(window: int, prompt: int, max_tokens: int) -> web.Response:
    message = (
        f"This model's maximum context length is {window} tokens. However, you requested "
        f"{prompt + max_tokens} tokens ({prompt} in the messages, {max_tokens} in the completion)."
    )
    error = {"message": message, "type": "invalid_request_error"}
    return web.json_response({"error": error | {"code": "context_length_exceeded"}}, status=400)


def gate_middleware(gate: Gate) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not request.path.endswith("/chat/completions"):
            return await handler(request)
        body: dict[str, Any] = json.loads(await request.read())
        messages = body["messages"]
        # Counted as the fake counts with chars_per_token=4: characters / 4 + 3 per message.
        prompt = sum(math.ceil(len(m["content"]) / 4) + 3 for m in messages)
        max_tokens = body.get("max_tokens")
        sent = Sent(messages[-1]["content"], prompt, max_tokens, refused=False)
        gate.sent.append(sent)
        if gate.window is not None and prompt + (max_tokens or 0) > gate.window:
            sent.refused = True
            return _refusal(gate.window, prompt, max_tokens or 0)
        if sent.kind == "final" and gate.refuse_finals > 0:
            gate.refuse_finals -= 1
            sent.refused = True
            return _refusal(gate.window or prompt, prompt, max_tokens or 0)
        return await handler(request)

    return middleware


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
async def fake_llm(gate: Gate) -> AsyncIterator[FakeLLM]:
    """The fake LLM behind the gate, tokenizing like a real model (4 characters per token)."""
    llm = FakeLLM()
    llm.app.middlewares.append(gate_middleware(gate))
    async with llm:
        llm.config.chars_per_token = 4.0
        yield llm


def intermediate_caps_fit_the_words_asked(gate: Gate) -> bool:
    """Every map and combine request asked for words that fit the max_tokens it was sent."""
    calls = gate.of_kind("map") + gate.of_kind("combine")
    for call in calls:
        asked = WORDS_ASKED.search(call.prompt)
        assert asked is not None and call.max_tokens is not None
        if int(asked.group(1)) * TOKENS_PER_WORD > call.max_tokens:
            return False
    return bool(calls)


def whole_answer(row: JobChunk, gate: Gate) -> bool:
    """The row's summary is the model's whole answer to the prompt that carried its text."""
    prompts = {
        s.prompt for s in gate.sent if text_hash(s.prompt.split(DIVIDER, 1)[1]) == row.text_hash
    }
    replies = {expected_reply("fake-small", [{"role": "user", "content": p}]) for p in prompts}
    return row.summary in replies and len(replies) == 1


async def test_a_max_tokens_over_a_quarter_of_the_window_is_budgeted_whole(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM, gate: Gate
) -> None:
    # Given a 4096-token model that refuses prompt + max_tokens > 4096, and a ~2,300-token
    # document whose user wants up to 2000 tokens of summary
    gate.window = 4096
    request = summarize(
        generate_document(1500, seed=1), context_window=4096, params={"max_tokens": 2000}
    )

    # When a worker summarizes it
    job = await run_to_end(service, start_worker, request, retry_base_s=0.01, retry_cap_s=0.05)

    # Then the first attempt succeeded: no request was refused, none overflowed the window
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.attempts == 1
    assert not gate.refused
    assert all(s.prompt_tokens + (s.max_tokens or 0) <= 4096 for s in gate.sent)

    # And the final call was sent the user's max_tokens unchanged; the map call its own cap
    (final,) = [s for s in gate.sent if s.kind in ("final", "single")]
    assert final.max_tokens == 2000
    assert gate.of_kind("map") and all(s.max_tokens == 512 for s in gate.of_kind("map"))
    assert intermediate_caps_fit_the_words_asked(gate)


async def test_a_final_call_with_a_large_max_tokens_fits_and_no_map_work_is_redone(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM, gate: Gate
) -> None:
    # Given a document of ~85k words, a 4096-token model that refuses prompt + max_tokens over
    # it, and a user max_tokens of 2000
    gate.window = 4096
    request = summarize(
        generate_document(85_000, seed=8), context_window=4096, params={"max_tokens": 2000}
    )

    # When a worker summarizes it
    job = await run_to_end(
        service, start_worker, request, timeout_s=120, retry_base_s=0.01, retry_cap_s=0.05
    )

    # Then one attempt did it, with nothing refused and every chunk mapped exactly once
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.attempts == 1 and job.chunk_scale in (None, 1.0)
    assert not gate.refused
    rows = await service.checkpoints.list_chunks(job.id)
    assert all(r.status == ChunkStatus.DONE for r in rows)
    maps = map_prompts(fake_llm)
    assert len(maps) == sum(r.level == 0 for r in rows) > 30 and set(maps.values()) == {1}
    assert fake_llm.stats.total_requests == len(rows)

    # And the final call carried the user's max_tokens within the window
    (final,) = gate.of_kind("final")
    assert final.max_tokens == 2000 and final.prompt_tokens + 2000 <= 4096


async def test_a_context_overflow_at_a_reduce_level_keeps_the_map_summaries(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM, gate: Gate
) -> None:
    # Given a model that refuses the first final reduce call as too long for its context
    gate.refuse_finals = 1
    request = summarize(generate_document(8_000, seed=2), context_window=2048)

    # When a worker summarizes the document
    job = await run_to_end(service, start_worker, request, retry_base_s=0.01, retry_cap_s=0.05)

    # Then the first attempt failed at the reduce level, transiently, and the second succeeded
    assert job.status == JobStatus.SUCCEEDED, job.error
    first, second = await service.store.list_attempts(job.id)
    assert (first.outcome, first.status_code) == (AttemptOutcome.TRANSIENT_ERROR, 400)
    assert first.error is not None and "maximum context length" in first.error
    assert not first.error.startswith("level 0")
    assert second.outcome == AttemptOutcome.SUCCEEDED
    assert job.chunk_scale == pytest.approx(0.5)

    # And the map summaries were kept: none superseded, none asked for twice
    rows = await service.checkpoints.list_chunks(job.id)
    level0 = [r for r in rows if r.level == 0]
    assert len(level0) >= 4
    assert all(r.status == ChunkStatus.DONE and r.attempts == 1 for r in level0)
    maps = map_prompts(fake_llm)
    assert len(maps) == len(level0) and set(maps.values()) == {1}


async def test_map_and_combine_calls_have_their_own_cap_not_the_users_max_tokens(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM, gate: Gate
) -> None:
    # Given a long document and a user who wants at most 12 tokens of summary
    gate.window = 2048
    request = summarize(
        generate_document(8_000, seed=2), context_window=2048, params={"max_tokens": 12}
    )

    # When a worker summarizes it
    job = await run_to_end(service, start_worker, request)

    # Then every map call was sent a cap of its own, and asked for words that fit it
    assert job.status == JobStatus.SUCCEEDED, job.error
    maps = gate.of_kind("map")
    assert len(maps) >= 4 and all(s.max_tokens == 512 for s in maps)
    assert intermediate_caps_fit_the_words_asked(gate)

    # And every intermediate summary is the model's whole answer, none cut off
    rows = await service.checkpoints.list_chunks(job.id)
    assert all(whole_answer(r, gate) for r in rows if r.level == 0)

    # And only the final summary follows the user's max_tokens, cut where they asked
    (final,) = gate.of_kind("final")
    assert final.max_tokens == 12
    assert job.finish_reason == "length"
    assert job.result is not None and len(job.result.split()) == 12


async def test_a_cut_off_intermediate_summary_is_asked_again_with_a_larger_cap(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM, gate: Gate
) -> None:
    # Given a target of 10 words, so map calls are capped at the minimum, and a model that
    # answers ~40 words whatever it is asked; two paragraphs that each leave room in a call
    gate.window = 2048
    paragraphs = [generate_document(700, seed=s).replace("\n\n", " ") for s in (1, 2)]
    request = summarize("\n\n".join(paragraphs), context_window=2048, target_words=10)

    # When a worker summarizes it
    job = await run_to_end(service, start_worker, request)

    # Then each map call was cut off at its cap and asked again once with twice the cap
    assert job.status == JobStatus.SUCCEEDED, job.error
    maps = gate.of_kind("map")
    caps: dict[str, list[int | None]] = {}
    for sent in maps:
        caps.setdefault(sent.prompt, []).append(sent.max_tokens)
    assert list(caps.values()) == [[MIN_SUMMARY_TOKENS, 2 * MIN_SUMMARY_TOKENS]] * 2
    assert not gate.refused

    # And only the whole answers were kept, with the cut-off calls' usage counted too
    rows = await service.checkpoints.list_chunks(job.id)
    level0 = [r for r in rows if r.level == 0]
    assert len(level0) == 2
    assert all(whole_answer(r, gate) and r.attempts == 1 for r in level0)
    assert job.completion_tokens == fake_llm.stats.completion_tokens_total
    assert job.prompt_tokens == fake_llm.stats.prompt_tokens_total


async def test_a_cut_off_intermediate_summary_with_no_room_to_grow_fails_the_job_clearly(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM, gate: Gate
) -> None:
    # Given a target of 10 words (map calls capped at the minimum), a model that answers ~40
    # words whatever it is asked, and text without boundaries, so every chunk fills its call
    gate.window = 2048
    document = " ".join(f"w{i}" for i in range(3000))
    request = summarize(document, context_window=2048, target_words=10)

    # When a worker summarizes it
    job = await run_to_end(service, start_worker, request)

    # Then the job failed at once, permanently, saying why and what to change
    assert job.status == JobStatus.FAILED
    assert job.attempts == 1
    assert job.error_code == "summary_failed"
    assert job.error is not None and "cut off" in job.error and "target_words" in job.error
    assert not gate.refused

    # And no cut-off answer was stored as a summary
    rows = await service.checkpoints.list_chunks(job.id)
    assert rows and all(r.summary is None for r in rows if r.status != ChunkStatus.DONE)
    assert any(r.status == ChunkStatus.FAILED for r in rows)
    assert all(whole_answer(r, gate) for r in rows if r.summary is not None)
    assert not gate.of_kind("final")


async def test_a_max_tokens_that_leaves_no_room_to_merge_summaries_fails_before_any_call(
    service: JobService, start_worker: WorkerFactory, fake_llm: FakeLLM, gate: Gate
) -> None:
    # Given a document too long for one call and a max_tokens that takes almost all the window
    gate.window = 2048
    request = summarize(
        generate_document(3_000, seed=3), context_window=2048, params={"max_tokens": 1990}
    )

    # When a worker tries it
    job = await run_to_end(service, start_worker, request)

    # Then it failed at once, permanently, without a call, saying what to change
    assert job.status == JobStatus.FAILED
    assert job.attempts == 1
    assert job.error_code == "summary_failed"
    assert job.error is not None and "params.max_tokens=1990" in job.error
    assert "context_window" in job.error
    assert fake_llm.stats.total_requests == 0
