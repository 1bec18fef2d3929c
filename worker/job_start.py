"""arq's start-of-job transaction, answered by the claim instead of a round trip of its own.

arq's `Worker.run_job` begins every job with a MULTI/EXEC: GET the job, INCR its try counter
and EXPIRE that counter (and ZREM the job from the abort set when aborts are allowed; a
promptq worker does not allow them). The claim script (worker.fastpoll.CLAIM_SCRIPT) runs the
same commands on each job it takes, in the same round trip as the claim, atomically with
setting the job's in-progress marker. `started(replies)` hands the replies to the job's task
(a ContextVar, copied into the task when it is created), and the worker's pool, patched by
`answer_job_starts`, gives the first transaction that task opens, which is run_job's, those
replies instead of sending it. At hundreds of jobs a second that is a socket write and read
per job less: about a tenth of a worker's CPU.

arq internals this relies on (arq 0.28; pyproject pins `arq<0.29`): run_job's first Redis call
is `async with pool.pipeline(transaction=True) as pipe`, queueing `get`, `incr` and `expire`
(and `zrem`), then `await pipe.execute()`; the try counter's TTL is ARQ_TRY_TTL_S.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from arq.connections import ArqRedis

#: arq's TTL of a job's try counter (`arq:retry:<id>`), set in run_job.
ARQ_TRY_TTL_S = 88400

_REPLIES: ContextVar[list[Any] | None] = ContextVar("promptq_job_start", default=None)


class _Answered:
    """Stands in for run_job's start transaction: queues nothing, replies with the claim's."""

    def __init__(self, replies: list[Any]) -> None:
        self._replies = replies

    async def __aenter__(self) -> _Answered:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def _queue(self, *args: Any, **kwargs: Any) -> _Answered:
        return self

    get = incr = expire = zrem = _queue

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        return self._replies


@contextlib.contextmanager
def started(replies: list[Any]) -> Iterator[None]:
    """While inside, a task created gets `replies` (job, try count, expire's reply) for its
    run_job's start transaction."""
    token = _REPLIES.set(replies)
    try:
        yield
    finally:
        _REPLIES.reset(token)


def answer_job_starts(pool: ArqRedis) -> None:
    """Make `pool` answer a task's first transaction from `started`'s replies, if it has any."""
    send = pool.pipeline

    def pipeline(transaction: bool = True, shard_hint: Any = None) -> Any:
        replies = _REPLIES.get()
        if replies is not None and transaction:
            _REPLIES.set(None)  # the task's first transaction only
            return _Answered(replies)
        return send(transaction=transaction, shard_hint=shard_hint)

    pool.pipeline = pipeline  # type: ignore[method-assign]
