"""The worker's side of the global limits: wait for a permit, hold it, give it back.

Two ways in:

* `acquire()` waits for as long as it takes; every LLM call goes through it (worker.routing),
  including each map and reduce call of a summarize job. Calls wait, they never fail.
* `before_claim()` runs before a job is claimed (for a bulk job, once it has its model slot:
  worker.jobs). It tries for `limit_wait_s`, or until `give_up()` says another job wants the
  slot; if the job's endpoint is still full it raises arq's `Retry`, so the job goes back to
  the queue, due when the limiter expects room (behind the jobs of that endpoint already
  waiting, at the rate calls were granted lately): no attempt is charged or recorded, and the
  slot is free for another model's job (an interactive job, priority above bulk, waits for its
  permit instead: handed back, it would queue up behind the bulk backlog). A permit it gets is
  held for the job's first call (a context variable carries it there); one the job never uses
  is given back at the end, refunded.

Permits are leases: this worker renews the ones it holds every lease_s/3, and those of a
worker that dies lapse by themselves. A permit given back is announced on a Redis channel, so
that a call waiting for it in each worker tries again at once. Local counters (waits, time
waited, deferrals) are kept per scope for metrics (`stats()`), next to what Redis says
(`promptq.limits.RedisLimits.state`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from arq import Retry
from redis.exceptions import RedisError
from sqlalchemy import update

from promptq import clock
from promptq.db import is_db_unavailable
from promptq.endpoints import Endpoint, EndpointTable
from promptq.limits import Grant, RedisLimits, ScopeLimits
from promptq.metrics import LimitReading
from promptq.models import Job, Priority
from promptq.outage import OutageLog
from promptq.settings import Settings
from promptq.store import CLAIMABLE, JobStore

logger = logging.getLogger(__name__)

#: Longest pause between two tries of a waiting call (a release wakes it sooner: in this
#: process directly, in another through the freed channel; this is the fallback).
MAX_POLL_S = 0.05
#: Shortest pause between two tries.
MIN_POLL_S = 0.002
#: Longest pause between two tries of a call waiting for a free max_in_flight place: a
#: permit given back anywhere wakes one waiting call per worker at once (the freed channel),
#: so this is only the fallback, for a lost message.
IN_FLIGHT_POLL_S = 0.25
#: Longest a job is deferred by the limiter. Deferrals longer than the reconciler's tolerance
#: also set the job's next_attempt_at, so that it is not brought forward.
MAX_DEFER_S = 60.0
RECONCILER_TOLERANCE_S = 1.5
#: Tokens counted per message on top of its text (role, separators).
MESSAGE_OVERHEAD_TOKENS = 4
#: Pause before asking Redis again when it is unreachable (calls wait; jobs are handed back).
REDIS_DOWN_PAUSE_S = 0.5

_HELD: contextvars.ContextVar[list[Permit] | None] = contextvars.ContextVar(
    "promptq_held_permits", default=None
)


@dataclass(slots=True)
class Permit:
    """The right to make one call in `scope`, with `tokens` reserved."""

    scope: str
    id: str
    bucket: int
    tokens: int
    #: Set once the call is made (a permit given back unused refunds its request).
    used: bool = False
    released: bool = False


@dataclass(frozen=True, slots=True)
class JobCall:
    """What a job's first call needs from the limits."""

    endpoint: Endpoint
    model: str
    #: Tokens to reserve (worker.limiter.estimate_tokens; a context window for a summary).
    tokens: int
    #: Above bulk priority: waits for its permit instead of going back to the queue.
    interactive: bool


@dataclass(slots=True)
class ScopeStats:
    """What this worker process saw of one scope (counters only grow)."""

    in_flight: int = 0
    waits: int = 0
    wait_seconds: float = 0.0
    deferrals: int = 0
    overloads: int = 0
    adaptive_limit: float | None = None


@dataclass(frozen=True, slots=True)
class LimitSnapshot:
    """One scope's limit for metrics: global numbers from Redis, waits of this process."""

    name: str
    #: Calls holding a permit of this scope right now, across all workers (None: unknown).
    in_flight: int | None
    #: The in-flight limit now: the adaptive one, else max_in_flight (None: no such limit).
    limit: float | None
    waits_total: int
    wait_seconds_total: float


@dataclass(slots=True)
class _Scope:
    limits: ScopeLimits
    stats: ScopeStats = field(default_factory=ScopeStats)
    #: Calls waiting for a permit, in order: a freed permit wakes the first (see _wake).
    sleepers: deque[asyncio.Future[None]] = field(default_factory=deque)
    held: dict[str, Permit] = field(default_factory=dict)
    #: When the last refusal said there may be room (seconds from then).
    hint_s: float = 0.0


def scope_limits(endpoint: Endpoint) -> ScopeLimits:
    """The script arguments of an endpoint's limits."""
    return endpoint.limits.scope_limits()


def estimate_tokens(
    messages: list[dict[str, Any]], params: dict[str, Any], *, chars_per_token: float, assumed: int
) -> int:
    """Tokens a call may use: its prompt (characters / chars_per_token) plus its max_tokens."""
    chars = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            parts = [part for part in content if isinstance(part, dict)]
            chars += sum(len(str(part.get("text", ""))) for part in parts)
    prompt = int(chars / chars_per_token) + MESSAGE_OVERHEAD_TOKENS * len(messages)
    completion = params.get("max_tokens", params.get("max_completion_tokens"))
    if not isinstance(completion, int) or isinstance(completion, bool) or completion < 0:
        completion = assumed
    return prompt + completion


class Limiter:
    """This worker's permits in the global limits (see the module docstring)."""

    def __init__(
        self,
        limits: RedisLimits,
        table: EndpointTable,
        *,
        lease_s: float,
        wait_s: float,
        rng: random.Random | None = None,
    ) -> None:
        self.redis = limits
        self.table = table
        self.lease_s = lease_s
        self.wait_s = wait_s
        self.rng = rng or random.Random()
        self._scopes: dict[str, _Scope] = {}
        self._tasks: list[asyncio.Task[None]] = []
        #: The limit checks of every waiting call: one line when Redis goes, not one per try.
        self._checks = OutageLog(logger, "checking the limits in Redis")

    # -- calls -----------------------------------------------------------------------------

    def limited(self, endpoint: Endpoint) -> bool:
        """True if calls to this endpoint go through the limiter."""
        return endpoint.limits.any

    async def acquire(self, endpoint: Endpoint, model: str, tokens: int) -> Permit:
        """A permit for one call to `model`: the one this job holds, or a new one (waiting)."""
        scope = endpoint.scope(model)
        held = _HELD.get()
        if held:
            for permit in held:
                if permit.scope == scope and not permit.used:
                    permit.used = True
                    await self._correct(permit, tokens)
                    return permit
        fresh = await self._try(endpoint, model, tokens, wait_s=None)
        assert fresh is not None  # without a time limit, _try waits until it has one
        fresh.used = True
        return fresh

    async def release(
        self, permit: Permit, *, tokens_used: int | None, latency_s: float | None, overload: bool
    ) -> None:
        """Give a permit back after its call: correct the tokens, feed the adaptive window."""
        state = self._scopes.get(permit.scope)
        if state is not None and state.limits.adaptive and permit.used:
            try:
                limit = await self.redis.observe(
                    permit.scope, state.limits, latency_s=latency_s, overload=overload
                )
                state.stats.adaptive_limit = limit
            except Exception:
                logger.warning("could not record a call in the adaptive limit", exc_info=True)
            if overload:
                state.stats.overloads += 1
        delta = 0 if tokens_used is None else tokens_used - permit.tokens
        await self._give_back(permit, token_delta=delta, refund=not permit.used)

    # -- jobs ------------------------------------------------------------------------------

    async def job_call(self, store: JobStore, settings: Settings, job_id: str) -> JobCall | None:
        """The first call of a job waiting to run whose endpoint has limits; else None.

        None too when the database is unreachable: the claim that follows meets the outage
        as well, and defers the job.
        """
        if not self.table.has_limits:
            return None
        try:
            return await self._job_call(store, settings, job_id)
        except Exception as exc:
            if is_db_unavailable(exc):
                return None
            raise

    async def before_claim(
        self,
        store: JobStore,
        call: JobCall,
        job_id: str,
        *,
        give_up: Callable[[], bool] | None = None,
    ) -> None:
        """Take the permit for a job's first call, or raise Retry to hand the job back.

        A bulk job tries for `limit_wait_s`, and stops trying as soon as `give_up()` is true;
        an interactive one waits as long as it takes (handed back, it would queue up behind
        the bulk backlog).
        """
        scope = self._scope(call.endpoint, call.model)
        wait_s = None if call.interactive else self.wait_s
        permit = await self._try(
            call.endpoint, call.model, call.tokens, wait_s=wait_s, job_id=job_id, give_up=give_up
        )
        if permit is not None:
            held = _HELD.get()
            if held is None:
                _HELD.set([permit])
            else:
                held.append(permit)
            return
        scope_name = call.endpoint.scope(call.model)
        defer_s = min(MAX_DEFER_S, self._last_hint_s(scope)) * self.rng.uniform(1.0, 1.5)
        try:  # behind the jobs already waiting for this scope
            defer_s = await self.redis.defer(
                scope_name, job_id, shortest_s=defer_s, longest_s=MAX_DEFER_S
            )
        except (RedisError, OSError):
            logger.debug("could not queue job %s for its limits", job_id, exc_info=True)
        scope.stats.deferrals += 1
        if defer_s > RECONCILER_TOLERANCE_S:
            await self._mark_due(store, job_id, clock.now() + timedelta(seconds=defer_s))
        logger.debug(
            "job %s waits for %s's limits; back in %.2f s", job_id, call.endpoint.name, defer_s
        )
        raise Retry(defer=timedelta(seconds=defer_s))

    async def _job_call(self, store: JobStore, settings: Settings, job_id: str) -> JobCall | None:
        request = await store.waiting_request(job_id)
        if request is None:
            return None
        endpoint = self.table.resolve(request.model)
        if not self.limited(endpoint):
            return None
        interactive = request.priority > Priority.BULK
        if request.input is None:  # a summarize call carries at most a window
            tokens = settings.context_window_tokens
        else:
            tokens = estimate_tokens(
                request.input.get("messages") or [],
                request.input.get("params") or {},
                chars_per_token=settings.chars_per_token,
                assumed=endpoint.limits.assumed_max_tokens,
            )
        return JobCall(endpoint, request.model, tokens, interactive)

    async def after_job(self) -> None:
        """Give back, refunded, the permits this job took but never used."""
        held = _HELD.get()
        if not held:
            return
        for permit in held:
            if not permit.used:
                await self._give_back(permit, token_delta=-permit.tokens, refund=True)
        held.clear()

    # -- background ------------------------------------------------------------------------

    def start(self) -> None:
        """Renew held permits' leases, and hear of permits freed by other workers, in the
        background until stop()."""
        self._tasks = [
            asyncio.create_task(self._renew_forever(), name="promptq-limit-leases"),
            asyncio.create_task(self._listen_for_freed(), name="promptq-limit-freed"),
        ]

    async def stop(self) -> None:
        """Stop renewing and listening."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def stats(self) -> dict[str, ScopeStats]:
        """This process's counters per scope (for metrics)."""
        return {name: scope.stats for name, scope in self._scopes.items()}

    async def readings(self) -> list[LimitReading]:
        """`snapshot()` as the Prometheus metrics read it (`Metrics.limits_source`)."""
        return [
            LimitReading(
                name=s.name,
                in_flight=s.in_flight,
                limit=s.limit,
                waits_total=s.waits_total,
                wait_seconds_total=s.wait_seconds_total,
            )
            for s in await self.snapshot()
        ]

    async def snapshot(self) -> list[LimitSnapshot]:
        """Every scope this worker has used: the calls in flight across all workers and the
        current limit (from Redis), with this process's waits (for metrics)."""
        readings = []
        for name, scope in list(self._scopes.items()):
            try:
                state = await self.redis.state(name, scope.limits)
            except (RedisError, OSError):
                in_flight = None
                limit = scope.stats.adaptive_limit if scope.limits.adaptive else None
            else:
                in_flight, limit = state.in_flight, state.adaptive_limit
            if limit is None and scope.limits.max_in_flight is not None:
                limit = float(scope.limits.max_in_flight)
            readings.append(
                LimitSnapshot(
                    name=name,
                    in_flight=in_flight,
                    limit=limit,
                    waits_total=scope.stats.waits,
                    wait_seconds_total=scope.stats.wait_seconds,
                )
            )
        return readings

    async def renew(self) -> int:
        """Renew every held permit now; returns how many Redis still had."""
        renewed = 0
        for name, scope in list(self._scopes.items()):
            ids = list(scope.held)
            if ids:
                renewed += await self.redis.renew(name, ids, lease_s=self.lease_s)
        return renewed

    async def _listen_for_freed(self) -> None:
        """Wake one of this process's calls waiting on a scope whenever any worker frees one
        of its permits (without this a call would only see it at its next try, up to
        IN_FLIGHT_POLL_S later); re-subscribe after a failure (the tries go on meanwhile)."""
        outage = OutageLog(logger, "freed-permits subscription")
        while True:
            try:
                async with self.redis.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.redis.freed_channel)
                    outage.ok()
                    async for message in pubsub.listen():
                        if message["type"] != "message":
                            continue
                        name = message["data"]
                        scope = self._scopes.get(name.decode() if isinstance(name, bytes) else name)
                        if scope is not None:
                            _wake(scope)
            except Exception as exc:  # never let it die: without it, waiting calls only poll
                outage.failed(exc, "re-subscribing")
                await asyncio.sleep(REDIS_DOWN_PAUSE_S)

    async def _renew_forever(self) -> None:
        outage = OutageLog(logger, "renewing limit permits")
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.renew()
                outage.ok()
            except Exception as exc:  # Redis may be briefly away; the next tick tries again
                outage.failed(exc, "trying again next tick")

    # -- internals -------------------------------------------------------------------------

    def _scope(self, endpoint: Endpoint, model: str) -> _Scope:
        name = endpoint.scope(model)
        scope = self._scopes.get(name)
        if scope is None:
            scope = self._scopes[name] = _Scope(scope_limits(endpoint))
        return scope

    async def _try(
        self,
        endpoint: Endpoint,
        model: str,
        tokens: int,
        *,
        wait_s: float | None,
        job_id: str = "",
        give_up: Callable[[], bool] | None = None,
    ) -> Permit | None:
        """A permit, trying until `wait_s` has passed (forever if None) or `give_up()` is
        true; None if none came."""
        scope = self._scope(endpoint, model)
        name = endpoint.scope(model)
        started = time.monotonic()
        waited = False
        waiter = job_id or uuid.uuid4().hex  # the same on every try (the tpm line)
        while True:
            permit_id = uuid.uuid4().hex
            try:
                grant = await self.redis.acquire(
                    name,
                    scope.limits,
                    permit_id=permit_id,
                    lease_s=self.lease_s,
                    tokens=tokens,
                    job_id=job_id,
                    waiter=waiter,
                )
            except (RedisError, OSError) as exc:
                # Limits can't be checked: wait (never call past them) until Redis is back.
                self._checks.failed(exc, "calls wait until Redis is back")
                grant = Grant(False, reason="redis", wait_s=REDIS_DOWN_PAUSE_S)
            else:
                self._checks.ok()
            if grant.granted:
                permit = Permit(name, permit_id, grant.bucket, grant.tokens)
                scope.held[permit_id] = permit
                scope.stats.in_flight += 1
                if waited:
                    scope.stats.waits += 1
                    scope.stats.wait_seconds += time.monotonic() - started
                return permit
            # A full max_in_flight frees when some call ends: soon, but nobody knows when.
            scope.hint_s = 0.0 if grant.reason == "max_in_flight" else grant.wait_s
            left_s = None if wait_s is None else wait_s - (time.monotonic() - started)
            if (left_s is not None and left_s <= 0) or (give_up is not None and give_up()):
                return None
            waited = True
            pause_s = min(max(grant.wait_s, MIN_POLL_S), MAX_POLL_S)
            if grant.reason == "max_in_flight":
                pause_s = IN_FLIGHT_POLL_S
            elif grant.reason == "redis":
                pause_s = REDIS_DOWN_PAUSE_S
            pause_s *= self.rng.uniform(0.5, 1.0)  # don't retry in lockstep
            if left_s is not None:
                pause_s = min(pause_s, left_s)
            await _doze(scope, pause_s, give_up)

    def _last_hint_s(self, scope: _Scope) -> float:
        return max(scope.hint_s, self.wait_s, MAX_POLL_S)

    async def _correct(self, permit: Permit, tokens: int) -> None:
        """Re-reserve a held permit's tokens for the call it is used for."""
        scope = self._scopes.get(permit.scope)
        budget = scope.limits.tpm_per_window if scope is not None else None
        if budget is not None:
            tokens = min(tokens, budget)  # as acquire reserves it
        if tokens == permit.tokens:
            return
        try:
            await self.redis.release(
                permit.scope,
                "",  # no permit to drop: only the bucket's tokens change
                bucket=permit.bucket,
                refund_request=False,
                token_delta=tokens - permit.tokens,
            )
        except (RedisError, OSError):  # the reservation stays as it was; usage corrects it
            logger.warning("could not adjust a token reservation", exc_info=True)
            return
        permit.tokens = tokens

    async def _give_back(self, permit: Permit, *, token_delta: int, refund: bool) -> None:
        if permit.released:
            return
        permit.released = True
        scope = self._scopes.get(permit.scope)
        if scope is not None:
            scope.held.pop(permit.id, None)
            scope.stats.in_flight -= 1
            _wake(scope)
        try:
            await self.redis.release(
                permit.scope,
                permit.id,
                bucket=permit.bucket,
                refund_request=refund,
                token_delta=token_delta,
            )
        except Exception:  # the lease lapses by itself; the correction is lost
            logger.warning("could not give back a limit permit", exc_info=True)

    @staticmethod
    async def _mark_due(store: JobStore, job_id: str, due: datetime) -> None:
        """Record when a deferred job is due, so that the reconciler doesn't bring it forward."""
        try:
            async with store.sessionmaker() as session, session.begin():
                await session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status.in_(CLAIMABLE))
                    .values(next_attempt_at=due)
                )
        except Exception:  # only a hint for the reconciler
            logger.debug("could not record when job %s is due", job_id, exc_info=True)


def _wake(scope: _Scope) -> None:
    """Wake the call that has waited longest on `scope` in this process: one permit was given
    back, one call can have it (each worker wakes one, and they race for it in Redis)."""
    while scope.sleepers:
        sleeper = scope.sleepers.popleft()
        if not sleeper.done():
            sleeper.set_result(None)
            return


async def _doze(scope: _Scope, pause_s: float, give_up: Callable[[], bool] | None) -> None:
    """Wait `pause_s`, or less: until `_wake` picks this call, or `give_up()` turns true
    (looked at every MAX_POLL_S)."""
    sleeper: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    scope.sleepers.append(sleeper)
    try:
        end = time.monotonic() + pause_s
        while (left_s := end - time.monotonic()) > 0:
            step_s = left_s if give_up is None else min(left_s, MAX_POLL_S)
            woken, _ = await asyncio.wait({sleeper}, timeout=step_s)
            if woken or (give_up is not None and give_up()):
                return
    finally:
        if not sleeper.done():
            sleeper.cancel()
            scope.sleepers.remove(sleeper)
