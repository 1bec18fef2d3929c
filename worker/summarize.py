"""Summarize jobs of any length.

A document that fits the model's window is summarized in one call, as it always was. A longer
one is cut into chunks by tokens (promptq.chunking) and each chunk is summarized by a map call,
at most `summary_fanout` at a time. Groups of summaries that fit the window are then merged by
reduce calls, level after level, until one call makes the final summary; a job that would need
more than `summary_max_depth` levels fails instead of looping.

Every summary is checkpointed in `job_chunks` as soon as its call returns, so a retry, a crash
or a redeploy redoes only the calls that had not finished. A failed call ends the attempt once
the calls already in flight have finished and been saved; the job's usual retry policy then
schedules the next attempt, which reuses everything saved.

The attempt's lease is renewed by the worker's LeaseKeeper like any other; when a renewal finds
the job cancelled or taken over, the attempt stops at once (ClaimLost) instead of making the
rest of its calls. A job's deadline applies to every call: none starts once it has passed, and
each call's timeout is cut to the time left.

Silent truncation: some servers (Ollama's OpenAI-compatible API) cut a prompt that does not fit
their context and still answer 200. The only evidence is the `prompt_tokens` they report, so each
call compares it with the local estimate. A call that evidently lost part of its prompt is thrown
away, the job's chunk scale shrinks, and the attempt fails transiently. (Ollama's native
`/api/chat` can refuse instead, with `"truncate": false`; promptq speaks the OpenAI API.)
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from promptq import events
from promptq.checkpoints import ChunkKey
from promptq.chunking import (
    MIN_CHUNK_TOKENS,
    TOKENS_PER_WORD,
    input_budget,
    messages_tokens,
    output_tokens,
    pack,
    split_text,
    text_hash,
    token_counter,
)
from promptq.errors import (
    ClaimLost,
    LLMError,
    PermanentLLMError,
    PromptTruncated,
    SummaryFailed,
    TransientLLMError,
)
from promptq.models import ChunkStatus
from promptq.store import Claim
from worker.context import WorkerContext
from worker.db_retry import retry_db
from worker.llm import Completion
from worker.prompts import (
    Messages,
    SummaryRequest,
    combine_messages,
    final_messages,
    map_messages,
    single_messages,
)
from worker.truncation import is_context_overflow, shrink_factor, truncation_ratio

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Map and intermediate summaries are asked to stay this far under their token reserve.
WORDS_MARGIN = 0.8

_SINGLE, _MAP, _COMBINE, _FINAL = "single", "map", "combine", "final"
#: The error of a call not made because the job's deadline had passed.
DEADLINE_PASSED = "the job's deadline passed before this call could start"


@dataclass(frozen=True, slots=True)
class _Failure:
    """A call of this attempt that produced no summary."""

    index: int
    error: LLMError
    #: For an evidently truncated prompt: the fraction the model read, and what it reported.
    kept_ratio: float | None = None
    reported_tokens: int | None = None


async def summarize(ctx: WorkerContext, claim: Claim) -> Completion:
    """Run one attempt of a summarize job; the Completion carries the final summary and the
    job's total usage. Raises LLMError subclasses like a single call would, or ClaimLost."""
    scale = await ctx["checkpoints"].chunk_scale(claim.job_id)
    return await run_while_held(ctx, claim, Summarizer(ctx, claim, scale).run())


async def run_while_held(ctx: WorkerContext, claim: Claim, work: Coroutine[Any, Any, T]) -> T:
    """Run `work` while the attempt owns its job; ClaimLost (and `work` cancelled) as soon as
    the worker's lease renewal finds it cancelled or taken over."""
    lost = asyncio.ensure_future(ctx["leases"].lost(claim).wait())
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClaimLost(f"job {claim.job_id} was cancelled or taken over")
    finally:
        for pending in (task, lost):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, lost, return_exceptions=True)


class Summarizer:
    """One attempt at one summarize job."""

    def __init__(self, ctx: WorkerContext, claim: Claim, scale: float) -> None:
        settings = ctx["settings"]
        self.ctx = ctx
        self.claim = claim
        self.request = SummaryRequest.from_input(claim.input)
        self.counter = token_counter(settings.chars_per_token)
        self.window_tokens = self.request.context_window or settings.context_window_tokens
        self.output_tokens = output_tokens(
            window_tokens=self.window_tokens,
            max_tokens=self.request.params.get("max_tokens"),
            target_words=self.request.target_words,
        )
        self.words = max(20, math.floor(self.output_tokens / TOKENS_PER_WORD * WORDS_MARGIN))
        self.scale = scale
        self.fanout = settings.summary_fanout
        self.max_depth = settings.summary_max_depth
        self.overlap_tokens = settings.summary_overlap_tokens
        self.min_ratio = settings.truncation_ratio
        self.stream_final = settings.summary_stream_final
        self.final: Completion | None = None

    async def run(self) -> Completion:
        """Summarize the document: one call if it fits, else map and reduce level by level."""
        budget = self._budget_tokens()
        document = self.request.document
        if self.counter(document, self.claim.model) <= budget:
            (summary,) = await self._level(0, [document], _SINGLE)
            return await self._result(summary)
        chunks = await asyncio.to_thread(
            split_text,
            document,
            max_tokens=budget,
            overlap_tokens=self.overlap_tokens,
            model=self.claim.model,
            counter=self.counter,
            markdown=self.request.markdown,
        )
        logger.info(
            "job %s: %d chunks of at most %d tokens", self.claim.job_id, len(chunks), budget
        )
        summaries = await self._level(0, [c.text for c in chunks], _MAP)
        level = 1
        while True:
            groups = pack(
                summaries, max_tokens=budget, model=self.claim.model, counter=self.counter
            )
            final = len(groups) == 1
            if not final and level >= self.max_depth:
                raise SummaryFailed(
                    f"after {self.max_depth} levels of reduce calls {len(groups)} summaries "
                    "still do not fit one call; raise PROMPTQ_SUMMARY_MAX_DEPTH or the job's "
                    "context_window, or ask for a shorter target_words"
                )
            summaries = await self._level(level, groups, _FINAL if final else _COMBINE)
            if final:
                return await self._result(summaries[0])
            level += 1

    def _budget_tokens(self) -> int:
        """Tokens of text one call may carry at the job's current scale."""
        overhead = max(
            messages_tokens(messages, self.claim.model, self.counter)
            for messages in (
                single_messages(self.request, ""),
                map_messages(self.request, "", index=99_999, total=99_999, words=self.words),
                combine_messages(self.request, "", words=self.words),
                final_messages(self.request, ""),
            )
        )
        budget = input_budget(
            window_tokens=self.window_tokens,
            output_tokens=self.output_tokens,
            overhead_tokens=overhead,
            scale=self.scale,
        )
        if budget < MIN_CHUNK_TOKENS:
            shrunk = f" shrunk to {self.scale:.0%} by truncated prompts" if self.scale < 1 else ""
            raise SummaryFailed(
                f"a context window of {self.window_tokens} tokens{shrunk} leaves {budget} tokens "
                f"per chunk (the prompt takes {overhead}, the answer {self.output_tokens}); the "
                "model's real window is smaller than that: set the job's context_window or "
                "PROMPTQ_CONTEXT_WINDOW_TOKENS to match it"
            )
        return budget

    async def _level(self, level: int, texts: list[str], kind: str) -> list[str]:
        """Summarize each text of one level (reusing saved summaries); all or an LLMError."""
        hashes = [text_hash(text) for text in texts]
        saved = await self.ctx["checkpoints"].plan(self.claim, level, hashes)
        results: list[str | None] = [
            saved[i].summary if i in saved else None for i in range(len(texts))
        ]
        failures: list[_Failure] = []
        semaphore = asyncio.Semaphore(self.fanout)
        await self._progress(level, results)

        async def run_one(index: int) -> None:
            async with semaphore:
                if failures:
                    return  # stop starting calls once one failed; those in flight finish
                key = ChunkKey(self.claim.job_id, level, index, hashes[index])
                results[index] = await self._call(key, texts[index], kind, len(texts), failures)
                if results[index] is not None:
                    await self._progress(level, results)

        tasks = [asyncio.create_task(run_one(i)) for i, r in enumerate(results) if r is None]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if failures:
            raise await self._attempt_error(level, results, failures)
        return [r for r in results if r is not None]

    async def _call(
        self,
        key: ChunkKey,
        text: str,
        kind: str,
        total: int,
        failures: list[_Failure],
    ) -> str | None:
        """One checkpointed LLM call; None (and an entry in `failures`) when it failed."""
        store = self.ctx["checkpoints"]
        left_s = self.claim.seconds_left()
        if left_s is not None and left_s <= 0:
            failures.append(_Failure(key.index, TransientLLMError(DEADLINE_PASSED)))
            return None
        if not await store.start(key):
            saved = await store.saved(key)
            if saved is None:
                raise ClaimLost(f"job {key.job_id} was re-planned by another attempt")
            return saved.summary
        messages = self._messages(kind, text, key.index, total)
        try:
            completion = await self._complete(messages, final=kind in (_SINGLE, _FINAL))
        except LLMError as exc:
            if is_context_overflow(exc):
                exc = PromptTruncated(exc.message, status_code=exc.status_code)
            failures.append(_Failure(key.index, exc))
            status = ChunkStatus.TRUNCATED if isinstance(exc, PromptTruncated) else None
            await store.fail(key, status=status or ChunkStatus.FAILED, error=exc.message)
            return None
        estimated = messages_tokens(messages, self.claim.model, self.counter)
        ratio = truncation_ratio(
            estimated_tokens=estimated,
            reported_tokens=completion.prompt_tokens,
            min_ratio=self.min_ratio,
        )
        if ratio is not None:
            error = PromptTruncated(
                f"the model reported {completion.prompt_tokens} prompt tokens for a prompt of "
                f"about {estimated}: it silently cut the prompt, so its real context window is "
                f"smaller than the {self.window_tokens} tokens assumed"
            )
            failures.append(_Failure(key.index, error, ratio, completion.prompt_tokens))
            await store.fail(
                key,
                status=ChunkStatus.TRUNCATED,
                error=error.message,
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
            )
            return None
        # The answer is in hand: keep it through a database outage, as run_job does its result.
        await retry_db(
            lambda: store.finish(
                key,
                completion.content,
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
            ),
            what=f"saving call {key.index} at level {key.level} of job {key.job_id}",
            give_up_after_s=self.ctx["settings"].db_retry_s,
            rng=self.ctx.get("rng"),
        )
        if kind in (_SINGLE, _FINAL):
            self.final = completion
        return completion.content

    def _messages(self, kind: str, text: str, index: int, total: int) -> Messages:
        if kind == _SINGLE:
            return single_messages(self.request, text)
        if kind == _MAP:
            return map_messages(self.request, text, index=index, total=total, words=self.words)
        if kind == _COMBINE:
            return combine_messages(self.request, text, words=self.words)
        return final_messages(self.request, text)

    async def _complete(self, messages: Messages, *, final: bool) -> Completion:
        llm, model = self.ctx["llm"], self.claim.model
        timeout_s = self.claim.seconds_left()  # a deadline cuts every call short
        if final:
            # The user's own parameters, as a one-call summary always had them.
            params = self.request.params
            if self.stream_final:
                return await llm.chat_stream(
                    model, list(messages), params, self._delta, timeout_s=timeout_s
                )
            return await llm.chat(model, list(messages), params, timeout_s=timeout_s)
        params = self.request.params | {"max_tokens": self.output_tokens}
        return await llm.chat(model, list(messages), params, timeout_s=timeout_s)

    async def _delta(self, text: str) -> None:
        await self._publish({"type": "token", "text": text})

    async def _progress(self, level: int, results: list[str | None]) -> None:
        done = sum(r is not None for r in results)
        await self._publish(
            {"type": "progress", "level": level, "chunks_done": done, "chunks_total": len(results)}
        )

    async def _publish(self, event: dict[str, Any]) -> None:
        queue = self.ctx["queue"]
        await events.publish(queue.redis, queue.queue_name, self.claim.job_id, event)

    async def _attempt_error(
        self,
        level: int,
        results: list[str | None],
        failures: list[_Failure],
    ) -> LLMError:
        """The error that ends this attempt, saying what was saved for the next one."""
        done, total = sum(r is not None for r in results), len(results)
        saved = f"{done} of {total} summaries at level {level} are saved for the next attempt"
        for failure in failures:
            exc = failure.error
            if isinstance(exc, PermanentLLMError):
                message = f"level {level} call {failure.index}: {exc.message}"
                return type(exc)(message, status_code=exc.status_code)
        truncated = [f for f in failures if isinstance(f.error, PromptTruncated)]
        if truncated:
            return await self._truncation_error(level, truncated, saved)
        first = failures[0]
        retry_after = [f.error.retry_after_s for f in failures if f.error.retry_after_s]
        return type(first.error)(
            f"level {level} call {first.index}: {first.error.message}; {saved}",
            status_code=first.error.status_code,
            retry_after_s=max(retry_after) if retry_after else None,
        )

    async def _truncation_error(
        self, level: int, truncated: list[_Failure], saved: str
    ) -> PromptTruncated:
        """Shrink the job's chunks for the next attempt and explain why.

        A model that cut one prompt at N tokens cut every prompt that reached N, even those
        within the tolerance: their summaries are thrown away too.
        """
        checkpoints = self.ctx["checkpoints"]
        reported = [f.reported_tokens for f in truncated if f.reported_tokens is not None]
        if reported:
            await checkpoints.discard_truncated(
                self.claim.job_id,
                level,
                min_prompt_tokens=min(reported),
                error=f"the model read at most {min(reported)} prompt tokens of longer prompts",
            )
        ratios = [f.kept_ratio for f in truncated if f.kept_ratio is not None]
        factor = shrink_factor(min(ratios) if ratios else None)
        await checkpoints.set_chunk_scale(self.claim, self.scale * factor)
        first = truncated[0]
        return PromptTruncated(
            f"level {level} call {first.index}: {first.error.message}; the next attempt cuts "
            f"chunks {factor:.0%} as large; {saved}",
            status_code=first.error.status_code,
        )

    async def _result(self, summary: str) -> Completion:
        """The job's answer: the final summary, with the usage of every call the job made."""
        prompt_tokens, completion_tokens = await self.ctx["checkpoints"].usage(self.claim.job_id)
        final = self.final
        return Completion(
            content=summary,
            finish_reason=final.finish_reason if final else None,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            model=final.model if final else None,
        )
