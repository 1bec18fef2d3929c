"""A prompt job's model call: streamed to listeners when asked, with fallback models.

* `stream`: the call is streamed from the backend and each piece of text is published on the
  job's event channel as `{"type": "token", "text", "call", "model"}` the moment it arrives
  (`/v1/chat/completions` with `stream: true` forwards them); the full text is returned, and
  stored, as for any call. `call` names the model call the piece belongs to, so a listener can
  tell a retry's text from the failed call's; `model` is the model writing it (a fallback's
  chunks name the fallback).
* `fallback_models`: attempt n starts at the n-th model of [model, *fallback_models] (staying
  on the last), and within an attempt a model that is unavailable (404) or fails transiently
  hands over to the next one at once. The attempt row records the model that answered.
"""

from __future__ import annotations

import logging

from sqlalchemy import update

from promptq import events
from promptq.errors import LLMError, PermanentLLMError
from promptq.models import JobAttempt
from promptq.store import Claim
from worker.context import WorkerContext
from worker.llm import Completion

logger = logging.getLogger(__name__)

#: The status with which an endpoint says it does not serve a model.
MODEL_NOT_FOUND = 404


def model_chain(claim: Claim) -> list[str]:
    """The models this attempt tries, in order."""
    models = [claim.model, *claim.input.get("fallback_models", [])]
    start = min(claim.charged - 1, len(models) - 1)
    return models[start:]


def falls_back(exc: LLMError) -> bool:
    """True if the next model should be tried: this one is unavailable or failing right now."""
    if isinstance(exc, PermanentLLMError):
        return exc.status_code == MODEL_NOT_FOUND
    return True


async def complete_prompt(ctx: WorkerContext, claim: Claim) -> Completion:
    """Call the model (or its fallbacks) for a prompt job."""
    chain = model_chain(claim)
    for position, model in enumerate(chain):
        if model != claim.model:
            await _record_model(ctx, claim, model)
        try:
            return await _call(ctx, claim, model, call=f"{claim.number}.{position}")
        except LLMError as exc:
            if position == len(chain) - 1 or not falls_back(exc):
                raise
            logger.info(
                "job %s: model %s failed (%s); falling back to %s",
                claim.job_id,
                model,
                exc.message,
                chain[position + 1],
            )
    raise AssertionError("unreachable: the chain is never empty")


async def _call(ctx: WorkerContext, claim: Claim, model: str, *, call: str) -> Completion:
    llm = ctx["llm"]
    messages = claim.input["messages"]
    params = claim.input.get("params", {})
    if not claim.input.get("stream"):
        return await llm.chat(model, messages, params, timeout_s=claim.seconds_left())
    queue = ctx["queue"]

    async def publish(text: str) -> None:
        event = {"type": "token", "text": text, "call": call, "model": model}
        await events.publish(queue.redis, queue.queue_name, claim.job_id, event)

    return await llm.chat_stream(model, messages, params, publish, timeout_s=claim.seconds_left())


async def _record_model(ctx: WorkerContext, claim: Claim, model: str) -> None:
    """Note on the attempt row which model it is calling now (so the answer's model is kept)."""
    async with ctx["store"].sessionmaker() as session, session.begin():
        await session.execute(
            update(JobAttempt)
            .where(JobAttempt.job_id == claim.job_id, JobAttempt.number == claim.number)
            .values(model=model)
        )
