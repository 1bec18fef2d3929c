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

Output budgets: the final call (or the only one) is sent the user's own parameters, and its
prompt is budgeted as the window less the `params.max_tokens` actually sent (whole, however much
of the window it takes) and the prompt's overhead, so prompt + max_tokens always fits; a
max_tokens that leaves too little room to merge even two summaries fails the job at once with
`summary_failed`. Map and combine calls get their own cap, never the user's max_tokens: about
1.4 tokens per `target_words`, else 512; at most a quarter of the window and half the final
call's input; at least enough to ask for 20 words. They are asked for 80% of that cap in words.
An intermediate answer the model ended with finish_reason "length" is never kept: the call is
asked again once with twice the cap (or what the window leaves, if at least 25% more), and a
second cut-off, or no room for a larger cap, fails the job with `summary_failed`. The final
summary is the user's, cut by their own max_tokens if they chose one; its finish_reason is the
job's.

Silent truncation: some servers (Ollama's OpenAI-compatible API) cut a prompt that does not fit
their context and still answer 200. The only evidence is the `prompt_tokens` they report, so each
call compares it with the local estimate. A call that evidently lost part of its prompt is thrown
away, the job's chunk scale shrinks, and the attempt fails transiently. A 400 "maximum context
length" counts the same. Truncation seen at a reduce level shrinks the reduce groups only: the
document's chunks are re-cut only after truncation at level 0, so saved map summaries survive.
(Ollama's native `/api/chat` can refuse instead, with `"truncate": false`; promptq speaks the
OpenAI API.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from promptq import events
from promptq.checkpoints import ChunkKey
from promptq.chunking import (
    MIN_CHUNK_TOKENS,
    MIN_SUMMARY_TOKENS,
    MIN_SUMMARY_WORDS,
    final_output_tokens,
    input_budget,
    messages_tokens,
    pack,
    split_text,
    summary_tokens,
    summary_words,
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

#: An intermediate answer cut off at its cap is asked again once with a cap this much larger,
#: or with what the window leaves, if that is at least LENGTH_RETRY_MIN_GROWTH times the cap.
LENGTH_RETRY_FACTOR = 2
LENGTH_RETRY_MIN_GROWTH = 1.25

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
        max_tokens = self.request.params.get("max_tokens")
        self.max_tokens: int | None = max_tokens if isinstance(max_tokens, int) else None
        #: The answer reserve of the final (or only) call: the user's max_tokens, sent as is.
        self.final_tokens = final_output_tokens(
            window_tokens=self.window_tokens,
            max_tokens=self.max_tokens,
            target_words=self.request.target_words,
        )
        #: The cap sent on map and combine calls, and the words they are asked for; run()
        #: lowers them if the final call could not otherwise take two summaries.
        self.summary_tokens = summary_tokens(
            window_tokens=self.window_tokens, target_words=self.request.target_words
        )
        self.words = summary_words(self.summary_tokens)
        #: The chunk scale of reduce levels, and (see _map_scale) of the document's chunks.
        self.scale = scale
        self.map_scale = scale
        self.fanout = settings.summary_fanout
        self.max_depth = settings.summary_max_depth
        self.overlap_tokens = settings.summary_overlap_tokens
        self.min_ratio = settings.truncation_ratio
        self.stream_final = settings.summary_stream_final
        self.final: Completion | None = None

    async def run(self) -> Completion:
        """Summarize the document: one call if it fits, else map and reduce level by level."""
        document = self.request.document
        model = self.claim.model
        self.map_scale = await self._map_scale()
        size = self.counter(document, model)
        if size <= self._budget(_SINGLE, self.map_scale):
            (summary,) = await self._level(0, [document], _SINGLE)
            return await self._result(summary)
        self._fit_summaries(size)
        chunk_budget = self._checked_budget(_MAP, self.map_scale)
        combine_budget = self._checked_budget(_COMBINE, self.scale)
        final_budget = self._checked_budget(_FINAL, self.scale)
        chunks = await asyncio.to_thread(
            split_text,
            document,
            max_tokens=chunk_budget,
            overlap_tokens=self.overlap_tokens,
            model=model,
            counter=self.counter,
            markdown=self.request.markdown,
        )
        logger.info(
            "job %s: %d chunks of at most %d tokens", self.claim.job_id, len(chunks), chunk_budget
        )
        summaries = await self._level(0, [c.text for c in chunks], _MAP)
        level = 1
        while True:
            groups = pack(summaries, max_tokens=final_budget, model=model, counter=self.counter)
            final = len(groups) == 1
            if not final:
                if level >= self.max_depth:
                    raise SummaryFailed(
                        f"after {self.max_depth} levels of reduce calls {len(groups)} summaries "
                        "still do not fit one call; raise PROMPTQ_SUMMARY_MAX_DEPTH or the job's "
                        "context_window, or ask for a shorter target_words"
                    )
                groups = pack(
                    summaries, max_tokens=combine_budget, model=model, counter=self.counter
                )
            summaries = await self._level(level, groups, _FINAL if final else _COMBINE)
            if final:
                return await self._result(summaries[0])
            level += 1

    async def _map_scale(self) -> float:
        """The chunk scale of the document's chunks (level 0).

        A prompt cut or refused at a reduce level says nothing against the map calls, which
        all succeeded before any reduce call was made: it shrinks the reduce groups only, so
        the saved map summaries stay in the plan. Only truncation seen at level 0 shrinks the
        document's chunks. (A job truncated at level 0 and later at a reduce level too re-cuts
        its chunks at the combined scale: the job keeps one scale.)
        """
        if self.scale >= 1:
            return self.scale
        rows = await self.ctx["checkpoints"].list_chunks(self.claim.job_id)
        if any(r.level == 0 and r.status == ChunkStatus.TRUNCATED for r in rows):
            return self.scale
        return 1.0

    def _overhead(self, kind: str) -> int:
        """Tokens the prompt of a `kind` call takes besides the text it carries."""
        messages = self._messages(kind, "", index=99_999, total=99_999)
        return messages_tokens(messages, self.claim.model, self.counter)

    def _reserve(self, kind: str) -> int:
        return self.final_tokens if kind in (_SINGLE, _FINAL) else self.summary_tokens

    def _budget(self, kind: str, scale: float) -> int:
        """Tokens of text one `kind` call may carry: its window less prompt and answer cap."""
        return input_budget(
            window_tokens=self.window_tokens,
            output_tokens=self._reserve(kind),
            overhead_tokens=self._overhead(kind),
            scale=scale,
        )

    def _fit_summaries(self, document_tokens: int) -> None:
        """Make intermediate summaries small enough that the final call takes two of them, or
        fail at once (SummaryFailed) when the user's max_tokens leaves no room for that."""
        room = self._budget(_FINAL, 1.0)
        fitting = min(self.summary_tokens, room // 2)
        if fitting < MIN_SUMMARY_TOKENS:
            raise SummaryFailed(
                f"params.max_tokens={self.max_tokens} leaves {max(room, 0)} tokens of the "
                f"{self.window_tokens}-token context window for the final call's input: the "
                f"document ({document_tokens} tokens) does not fit one call, and merging "
                f"summaries of at least {MIN_SUMMARY_WORDS} words needs {2 * MIN_SUMMARY_TOKENS}; "
                "lower params.max_tokens or raise the job's context_window"
            )
        if fitting < self.summary_tokens:
            self.summary_tokens = fitting
            self.words = summary_words(fitting)

    def _checked_budget(self, kind: str, scale: float) -> int:
        """`_budget`, or SummaryFailed when it is too small to be worth a call."""
        budget = self._budget(kind, scale)
        if budget < MIN_CHUNK_TOKENS:
            shrunk = f" shrunk to {scale:.0%} by truncated prompts" if scale < 1 else ""
            answer = (
                f"the answer {self.final_tokens} (params.max_tokens)"
                if kind == _FINAL and self.max_tokens is not None
                else f"the answer {self._reserve(kind)}"
            )
            raise SummaryFailed(
                f"a context window of {self.window_tokens} tokens{shrunk} leaves {budget} tokens "
                f"per {kind} call (the prompt takes {self._overhead(kind)}, {answer}); the "
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
        if not await self._durably(lambda: store.start(key), "starting", key):
            saved = await store.saved(key)
            if saved is None:
                raise ClaimLost(f"job {key.job_id} was re-planned by another attempt")
            return saved.summary
        messages = self._messages(kind, text, key.index, total)
        final = kind in (_SINGLE, _FINAL)
        estimated = messages_tokens(messages, self.claim.model, self.counter)
        cap = None if final else self.summary_tokens
        prompt_tokens = completion_tokens = 0  # of every call made for this key here
        while True:
            try:
                completion = await self._complete(messages, final=final, cap=cap)
            except LLMError as exc:
                if is_context_overflow(exc):
                    exc = PromptTruncated(exc.message, status_code=exc.status_code)
                truncated = isinstance(exc, PromptTruncated)
                status = ChunkStatus.TRUNCATED if truncated else ChunkStatus.FAILED
                failure = _Failure(key.index, exc)
                await self._fail(key, failures, failure, status, prompt_tokens, completion_tokens)
                return None
            prompt_tokens += completion.prompt_tokens or 0
            completion_tokens += completion.completion_tokens or 0
            ratio = truncation_ratio(
                estimated_tokens=estimated,
                reported_tokens=completion.prompt_tokens,
                min_ratio=self.min_ratio,
            )
            if ratio is not None:
                error = PromptTruncated(
                    f"the model reported {completion.prompt_tokens} prompt tokens for a prompt "
                    f"of about {estimated}: it silently cut the prompt, so its real context "
                    f"window is smaller than the {self.window_tokens} tokens assumed"
                )
                failure = _Failure(key.index, error, ratio, completion.prompt_tokens)
                await self._fail(
                    key, failures, failure, ChunkStatus.TRUNCATED, prompt_tokens, completion_tokens
                )
                return None
            if cap is None or completion.finish_reason != "length":
                break
            # An intermediate summary cut off at its cap lost the end of its part: never kept.
            bigger = self._length_retry_cap(cap, estimated)
            if bigger is None:
                failure = _Failure(
                    key.index, self._cut_off_error(kind, cap, completion.completion_tokens)
                )
                await self._fail(
                    key, failures, failure, ChunkStatus.FAILED, prompt_tokens, completion_tokens
                )
                return None
            logger.info(
                "job %s: level %d call %d was cut off at %d tokens; asking again with %d",
                key.job_id,
                key.level,
                key.index,
                cap,
                bigger,
            )
            cap = bigger
        # The answer is in hand: keep it through a database outage, as run_job does its result.
        await self._durably(
            lambda: store.finish(
                key,
                completion.content,
                prompt_tokens=prompt_tokens if completion.prompt_tokens is not None else None,
                completion_tokens=(
                    completion_tokens if completion.completion_tokens is not None else None
                ),
            ),
            "saving",
            key,
        )
        if final:
            self.final = completion
        return completion.content

    async def _fail(
        self,
        key: ChunkKey,
        failures: list[_Failure],
        failure: _Failure,
        status: ChunkStatus,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """Note why call `key` produced no summary, in `failures` and in its checkpoint row."""
        failures.append(failure)
        await self._durably(
            lambda: self.ctx["checkpoints"].fail(
                key,
                status=status,
                error=failure.error.message,
                prompt_tokens=prompt_tokens or None,
                completion_tokens=completion_tokens or None,
            ),
            "recording the failure of",
            key,
        )

    async def _durably(self, write: Callable[[], Awaitable[T]], doing: str, key: ChunkKey) -> T:
        """A checkpoint write, retried through a database outage (worker.db_retry): one blip
        must not fail the call, which would cancel the level's other calls in flight."""
        return await retry_db(
            write,
            what=f"{doing} call {key.index} at level {key.level} of job {key.job_id}",
            give_up_after_s=self.ctx["settings"].db_retry_s,
            rng=self.ctx.get("rng"),
        )

    def _length_retry_cap(self, cap: int, estimated_prompt_tokens: int) -> int | None:
        """The cap to ask a cut-off intermediate call again with: twice `cap`, or what the
        window leaves after the prompt if less; None when that is no real improvement (the
        window is full) or the call was already asked again."""
        if cap != self.summary_tokens:
            return None
        bigger = min(LENGTH_RETRY_FACTOR * cap, self.window_tokens - estimated_prompt_tokens)
        return bigger if bigger >= LENGTH_RETRY_MIN_GROWTH * cap else None

    def _cut_off_error(self, kind: str, cap: int, written: int | None) -> SummaryFailed:
        what = "part summary" if kind == _MAP else "merged summary"
        return SummaryFailed(
            f"the model's {what} was cut off at {written or cap} tokens (finish_reason "
            f'"length", max_tokens={cap}) although it was asked for at most {self.words} '
            "words; a cut-off summary loses the end of its part, so it is never kept. The "
            "model does not keep to the length it is asked for (or spends its answer on "
            "reasoning): use one that does, or give a larger target_words (intermediate "
            f"summaries may take {MIN_SUMMARY_TOKENS} tokens up to a quarter of the window)"
        )

    def _messages(self, kind: str, text: str, index: int, total: int) -> Messages:
        if kind == _SINGLE:
            return single_messages(self.request, text)
        if kind == _MAP:
            return map_messages(self.request, text, index=index, total=total, words=self.words)
        if kind == _COMBINE:
            return combine_messages(self.request, text, words=self.words)
        return final_messages(self.request, text)

    async def _complete(self, messages: Messages, *, final: bool, cap: int | None) -> Completion:
        llm, model = self.ctx["llm"], self.claim.model
        timeout_s = self.claim.seconds_left()  # a deadline cuts every call short
        if final:
            # The user's own parameters, as a one-call summary always had them: its budget
            # reserved their max_tokens whole (see run()).
            params = self.request.params
            if self.stream_final:
                return await llm.chat_stream(
                    model, list(messages), params, self._delta, timeout_s=timeout_s
                )
            return await llm.chat(model, list(messages), params, timeout_s=timeout_s)
        # Map and combine calls have their own cap, whatever the user's max_tokens.
        params = self.request.params | {"max_tokens": cap or self.summary_tokens}
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
        within the tolerance: their summaries are thrown away too. The scale shrinks the
        document's chunks only if the truncation was at level 0 (see _map_scale); at a reduce
        level it shrinks the reduce groups and the map summaries are kept.
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
