"""The job function: run one attempt of a job and record exactly what happened."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from datetime import datetime, timedelta
from typing import Any

from arq import Retry

from promptq import clock, logs
from promptq.db import is_db_unavailable
from promptq.errors import ClaimLost, LLMError, PermanentLLMError, TransientLLMError
from promptq.models import AttemptOutcome, JobKind, JobStatus
from promptq.single_flight import Following
from promptq.store import DEADLINE_EXCEEDED, AttemptResult, Busy, Claim, deadline_message
from worker.context import WorkerContext
from worker.db_retry import retry_db
from worker.llm import Completion
from worker.observe import record_attempt
from worker.prompt_call import complete_prompt
from worker.prompts import SummaryRequest, single_messages
from worker.retry import backoff_delay_s
from worker.slots import SlotsClosed, Ticket
from worker.summarize import summarize

logger = logging.getLogger(__name__)

#: When the database is unreachable at the claim, arq delivers the job again after this long
#: (give or take half), instead of dropping it.
CLAIM_RETRY_S = 2.0
#: How long a worker that is stopping tries to record an interrupted attempt; if it can't,
#: the lease runs out and the attempt is recorded as interrupted by whoever takes the job over.
INTERRUPTED_RETRY_S = 5.0
#: Longest slice of a database's refusal kept in the error of an answer it refused.
MAX_REASON_CHARS = 300


def build_messages(claim: Claim) -> list[dict[str, Any]]:
    """The chat messages for a job's input (a summarize job's single-call form)."""
    if claim.kind == JobKind.PROMPT:
        messages: list[dict[str, Any]] = claim.input["messages"]
        return messages
    request = SummaryRequest.from_input(claim.input)
    return list(single_messages(request, request.document))


async def complete(ctx: WorkerContext, claim: Claim) -> Completion:
    """Do the job's LLM work: one call for a prompt job, map-reduce for a summarize job."""
    if claim.kind == JobKind.SUMMARIZE:
        return await summarize(ctx, claim)
    return await complete_prompt(ctx, claim)  # streaming and fallback models: worker.prompt_call


async def run_job(ctx: WorkerContext, job_id: str) -> None:
    """Run the next attempt of `job_id`; on a transient error, schedule the one after.

    If the job's endpoint has limits, the job takes the permit for its first call before it
    is claimed (worker.limiter). A bulk job first waits for its model slot, so that jobs
    waiting for a slot hold no permits: every permit is in use at the model, and the calls in
    flight reach the limit. If the endpoint is still full, the job goes back to the queue (it
    waits there, uncharged, and the slots run other jobs). An interactive job waits for its
    permit, then for a slot, where it comes first.
    """
    limiter, slots = ctx["limiter"], ctx["slots"]
    ticket: Ticket | None = None
    try:
        call = await limiter.job_call(ctx["store"], ctx["settings"], job_id)
        if call is not None:
            give_up = None
            if not call.interactive:
                scope = call.endpoint.scope(call.model)
                try:
                    ticket = await slots.take(ctx.get("score", 0), tag=scope)
                except SlotsClosed:
                    raise Retry() from None  # the worker is stopping; nothing has run yet
                # Don't keep a slot that a job of another model could use (one that waits
                # for the same limits would be no better off with it).
                give_up = functools.partial(slots.wanted, excluding=scope)
            await limiter.before_claim(ctx["store"], call, job_id, give_up=give_up)
        await _claim_and_run(ctx, job_id, ticket)
    finally:
        if ticket is not None:
            slots.give_back(ticket)
        await limiter.after_job()


async def _claim_and_run(ctx: WorkerContext, job_id: str, ticket: Ticket | None) -> None:
    store, leases = ctx["store"], ctx["leases"]
    try:
        claim = await store.claim(job_id, worker=ctx["worker_name"], lease_s=leases.lease_s)
    except Exception as exc:
        if not is_db_unavailable(exc):
            raise
        # Nothing has run yet: have arq deliver the job again later instead of dropping it.
        defer_s = CLAIM_RETRY_S * ctx["rng"].uniform(0.5, 1.5)
        logger.warning(
            "database unavailable claiming job %s (%s); trying again in %.1f s",
            job_id,
            exc.__class__.__name__,
            defer_s,
        )
        raise Retry(defer=timedelta(seconds=defer_s)) from exc
    if claim is None:
        logger.info("job %s is finished or cancelled; skipping this delivery", job_id)
        return
    if isinstance(claim, Busy):
        # Another worker holds the lease: look again when it would have expired.
        raise Retry(defer=timedelta(seconds=claim.retry_in_s + 0.1))
    if isinstance(claim, Following):  # an identical job is on its way: wait for its answer
        logger.debug(
            "job %s waits for identical job %s; looking again in %.2f s",
            job_id,
            claim.leader_id,
            claim.retry_in_s,
        )
        ctx["followers"].watch(job_id, claim.leader_id, claim.priority, claim.retry_in_s)
        raise Retry(defer=timedelta(seconds=claim.retry_in_s))
    logs.bind_job(job_id, claim.number)
    leases.hold(claim)
    try:
        _announce(ctx, claim.job_id)  # now running: live views (the dashboard) show it
        await _attempt(ctx, claim, ticket)
    finally:
        leases.release(claim)


class Stopwatch:
    """Milliseconds since the attempt got its model slot (since it began, until then)."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def restart(self) -> None:
        self.started = time.monotonic()

    def __call__(self) -> int:
        return round((time.monotonic() - self.started) * 1000)


async def _attempt(ctx: WorkerContext, claim: Claim, ticket: Ticket | None) -> None:
    try:
        await _run_attempt(ctx, claim, Stopwatch(), ticket)
    except Retry:
        _announce(ctx, claim.job_id)
        raise
    _announce(ctx, claim.job_id)


def _announce(ctx: WorkerContext, job_id: str) -> None:
    """Tell stream listeners the job's status changed (they read the new one from SQL)."""
    ctx["announcer"].announce(job_id)


async def _run_attempt(
    ctx: WorkerContext, claim: Claim, elapsed_ms: Stopwatch, ticket: Ticket | None
) -> None:
    cancels = ctx.get("cancels")
    try:
        with cancels.cancellable(claim) if cancels else contextlib.nullcontext():
            # worker.slots: prefetched jobs wait here, in the queue's order (arq's score)
            async with ctx["slots"].hold(ctx.get("score", 0), ticket):
                elapsed_ms.restart()  # an attempt's latency is its model work
                completion = await complete(ctx, claim)
    except asyncio.CancelledError:
        if cancels is not None and cancels.consume(claim):
            await _record_cancelled(ctx, claim, elapsed_ms())
            return
        # The worker is stopping (or arq timed the job out): hand the job back, uncharged.
        await _hand_back(ctx, claim, elapsed_ms(), "the worker stopped during this attempt")
        raise
    except SlotsClosed:
        await _hand_back(ctx, claim, 0, "the worker stopped before this attempt reached the model")
        raise Retry() from None  # back on the queue now
    except ClaimLost as exc:
        logger.warning("job %s attempt %d stopped: %s", claim.job_id, claim.number, exc.message)
    except LLMError as exc:
        await _record_failure(ctx, claim, exc, elapsed_ms())
    except Exception as exc:  # a bug or an unexpected library error: retry, keep the evidence
        logger.exception("job %s attempt %d crashed", claim.job_id, claim.number)
        await _record_failure(
            ctx, claim, TransientLLMError(f"internal error: {exc!r}"), elapsed_ms()
        )
    else:
        await _record_success(ctx, claim, completion, elapsed_ms())


async def _record_success(
    ctx: WorkerContext, claim: Claim, completion: Completion, latency_ms: int
) -> None:
    """Store the answer. If the database refuses it (not an outage: a value it will not
    store), the attempt fails, charged: left to the lease, it would run again forever."""
    try:
        await _store_success(ctx, claim, completion, latency_ms)
    except Exception as exc:
        if is_db_unavailable(exc):
            raise
        logger.exception("job %s attempt %d: its answer was refused", claim.job_id, claim.number)
        reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:MAX_REASON_CHARS]}"
        refused = TransientLLMError(f"the database refused the model's answer ({reason})")
        await _record_failure(ctx, claim, refused, latency_ms)


async def _hand_back(ctx: WorkerContext, claim: Claim, latency_ms: int, why: str) -> None:
    """Record the attempt as interrupted and the job as queued again, uncharged."""
    await _finish(
        ctx,
        claim,
        AttemptResult(
            outcome=AttemptOutcome.INTERRUPTED, latency_ms=latency_ms, error=f"interrupted: {why}"
        ),
        job_status=JobStatus.QUEUED,
        give_up_after_s=INTERRUPTED_RETRY_S,
    )


async def _store_success(
    ctx: WorkerContext, claim: Claim, completion: Completion, latency_ms: int
) -> None:
    await _finish(
        ctx,
        claim,
        AttemptResult(
            outcome=AttemptOutcome.SUCCEEDED,
            latency_ms=latency_ms,
            status_code=200,
            result=completion.content,
            finish_reason=completion.finish_reason,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
        ),
        job_status=JobStatus.SUCCEEDED,
    )
    logger.debug("job %s succeeded on attempt %d in %d ms", claim.job_id, claim.number, latency_ms)


async def _record_cancelled(ctx: WorkerContext, claim: Claim, latency_ms: int) -> None:
    """The job was cancelled while this attempt waited on the model: record both as such."""
    await _finish(
        ctx,
        claim,
        AttemptResult(
            outcome=AttemptOutcome.CANCELLED,
            latency_ms=latency_ms,
            error="cancelled on request while this attempt ran",
            error_code="cancelled",
        ),
        job_status=JobStatus.CANCELLED,
    )
    logger.info("job %s cancelled during attempt %d", claim.job_id, claim.number)


async def _record_failure(ctx: WorkerContext, claim: Claim, exc: LLMError, latency_ms: int) -> None:
    permanent = isinstance(exc, PermanentLLMError)
    result = AttemptResult(
        outcome=AttemptOutcome.PERMANENT_ERROR if permanent else AttemptOutcome.TRANSIENT_ERROR,
        latency_ms=latency_ms,
        status_code=exc.status_code,
        error=exc.message,
        error_code=exc.code,
    )
    if permanent or claim.is_last:
        await _finish(ctx, claim, result, job_status=JobStatus.FAILED)
        logger.warning(
            "job %s failed on attempt %d/%d: %s",
            claim.job_id,
            claim.number,
            claim.max_attempts,
            exc.message,
        )
        return
    settings = ctx["settings"]
    delay_s = backoff_delay_s(
        claim.charged,
        base_s=settings.retry_base_s,
        cap_s=settings.retry_cap_s,
        retry_after_s=exc.retry_after_s,
        retry_after_cap_s=settings.retry_after_cap_s,
        rng=ctx["rng"],
    )
    next_attempt_at = clock.now() + timedelta(seconds=delay_s)
    if claim.deadline_at is not None and next_attempt_at >= claim.deadline_at:
        # The next attempt could not start before the deadline: fail now, keep the real error.
        job_error = (
            f"{deadline_message(claim.deadline_s, claim.charged)}; last error: {exc.message}"
        )
        await _finish(
            ctx,
            claim,
            result,
            job_status=JobStatus.FAILED,
            job_error=(job_error, DEADLINE_EXCEEDED),
        )
        logger.warning("job %s failed: %s", claim.job_id, job_error)
        return
    moved = await _finish(
        ctx, claim, result, job_status=JobStatus.RETRYING, next_attempt_at=next_attempt_at
    )
    if not moved:
        return  # cancelled meanwhile: don't come back
    if claim.priority > 0:
        # Its slot serves other jobs during the backoff; then it goes ahead of bulk work again
        # (worker.ahead).
        ctx["ahead"].after(delay_s, claim.job_id, claim.priority)
    logger.info(
        "job %s attempt %d failed (%s); retrying in %.2f s",
        claim.job_id,
        claim.number,
        exc.message,
        delay_s,
    )
    raise Retry(defer=timedelta(seconds=delay_s) if delay_s > 0 else None)


async def _finish(
    ctx: WorkerContext,
    claim: Claim,
    result: AttemptResult,
    *,
    job_status: JobStatus,
    next_attempt_at: datetime | None = None,
    job_error: tuple[str, str] | None = None,
    give_up_after_s: float | None = None,
) -> bool:
    """store.finish_attempt, retried through a database outage (see worker.db_retry).

    A summarize job that did not succeed still gets the usage of the calls it made so far
    (its checkpoints'), as a succeeded one does from its result.
    """
    store = ctx["store"]
    record_attempt(ctx, claim, result, retrying=job_status == JobStatus.RETRYING)
    spent = claim.kind == JobKind.SUMMARIZE and job_status != JobStatus.SUCCEEDED

    async def write() -> bool:
        return await store.finish_attempt(
            claim,
            result,
            job_status=job_status,
            next_attempt_at=next_attempt_at,
            job_error=job_error,
            job_usage=await ctx["checkpoints"].usage(claim.job_id) if spent else None,
        )

    return await retry_db(
        write,
        what=f"recording attempt {claim.number} of job {claim.job_id} ({result.outcome})",
        give_up_after_s=(
            ctx["settings"].db_retry_s if give_up_after_s is None else give_up_after_s
        ),
        rng=ctx["rng"],
    )
