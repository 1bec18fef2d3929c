"""Global limits in Redis, shared by every worker on every machine: atomic Lua scripts.

Each limit scope (an endpoint, or one model of an endpoint) has these keys (and two for
the line of jobs waiting) under
`<queue_name>:limits:<scope>:`

* `inflight`: a sorted set of permits, scored by when their lease runs out (Redis time, ms).
  A worker renews the leases of the calls it is making; a dead worker's permits lapse and are
  dropped by the next acquire, so they come back by themselves.
* `rpm` and `tpm`: hashes of counts per time bucket (a window is WINDOW_BUCKETS buckets), each
  field named by the Redis time (ms) its bucket ends at: a bucket counts while its end is less
  than a window ago, so a limit is never exceeded, and buckets written under another
  `window_s` (other sizes) still count for exactly the calls they hold, and leave in time.
* `tpm_hold`: the call first refused for tokens (its id and tokens): later calls leave room for
  it, so a big call is not starved by a stream of small ones.
* `aimd`: the adaptive in-flight limit and its current window of observations.

Every decision is one script run, so two workers can never both take the last permit. Time is
Redis's own (`TIME`), so workers' clocks don't matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

#: Buckets per rate window (rpm/tpm); the window is counted with one bucket to spare.
WINDOW_BUCKETS = 20
#: How long the call first refused for tokens keeps its place (`tpm_hold`) without trying
#: again; a job handed back keeps it until it is due, and this long after.
HOLD_S = 5.0
#: Smallest number of calls an adaptive window holds before it is judged.
AIMD_MIN_SAMPLES = 5
#: A window with at least this many overload responses, and OVERLOAD_SHARE of its calls, is
#: overloaded: one error (or one unlucky burst) never lowers the limit on its own.
AIMD_MIN_OVERLOADS = 2
AIMD_OVERLOAD_SHARE = 0.1
#: An adaptive limit (and the latency it learnt) is forgotten after this long without a call:
#: the backend may have changed meanwhile, so it starts again from `initial_in_flight`.
ADAPTIVE_MEMORY_S = 86400.0

# KEYS: inflight, rpm, tpm, aimd, grants, waiters, tpm_hold
# ARGV: permit id, lease ms, max in flight (0: none), adaptive (1/0), min, initial,
#       rpm per window (0: none), tpm per window (0: none), tokens, window ms, job id ('': none),
#       waiter id (the same on every try of one call), hold ms, adaptive memory ms
# A call needing more tokens than the whole tpm budget reserves the budget (it runs once the
# window is empty). The first call refused for tokens holds its place (`tpm_hold`, for hold
# ms, renewed by each of its tries): later calls only go while they leave room for it.
# Returns {1, bucket, tokens reserved} when granted, {0, reason, wait ms} when not.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[3])
if ARGV[12] ~= '' and redis.call('HGET', KEYS[7], 'id') == ARGV[12] then
  redis.call('PEXPIRE', KEYS[7], tonumber(ARGV[13]))  -- the holder is still trying
end
if ARGV[4] == '1' then
  local lo, hi = tonumber(ARGV[5]), limit
  local cur = tonumber(redis.call('HGET', KEYS[4], 'limit'))
  if cur == nil then
    cur = tonumber(ARGV[6])
    redis.call('HSET', KEYS[4], 'limit', cur)
    redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[14]))
  end
  local clamped = math.max(lo, math.min(hi, cur))
  if clamped ~= cur then redis.call('HSET', KEYS[4], 'limit', tostring(clamped)) end
  limit = math.floor(clamped)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if limit > 0 then
  local n = redis.call('ZCARD', KEYS[1])
  if n >= limit then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, 'max_in_flight', math.max(1, tonumber(first[2]) - now)}
  end
end
local window = tonumber(ARGV[10])
local bucket_ms = window / 20
-- a bucket is named by when it ends: it counts while that is less than a window ago
local bucket = math.ceil((math.floor(now / bucket_ms) + 1) * bucket_ms)
local cutoff = now - window
local function used(key)
  local sum, first = 0, nil
  local fields = redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    local b = tonumber(fields[i])
    if b == nil or b <= cutoff then
      redis.call('HDEL', key, fields[i])
    else
      local v = tonumber(fields[i + 1])
      sum = sum + v
      if v > 0 and (first == nil or b < first) then first = b end
    end
  end
  local wait = 1
  if first ~= nil then wait = math.max(1, first + window - now) end
  return sum, wait
end
local rpm, tpm, tokens = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
if rpm > 0 then
  local sum, wait = used(KEYS[2])
  if sum + 1 > rpm then return {0, 'rpm', math.ceil(wait)} end
end
if tpm > 0 then
  tokens = math.min(tokens, tpm)
  local sum, wait = used(KEYS[3])
  local waiter = ARGV[12]
  local holder = redis.call('HGET', KEYS[7], 'id')
  local ahead = 0
  if holder and holder ~= waiter then
    ahead = tonumber(redis.call('HGET', KEYS[7], 'tokens')) or 0
  end
  if sum + tokens + ahead > tpm then
    if (not holder or holder == waiter) and waiter ~= '' then
      redis.call('HSET', KEYS[7], 'id', waiter, 'tokens', tokens)
      redis.call('PEXPIRE', KEYS[7], tonumber(ARGV[13]))
    end
    return {0, 'tpm', math.ceil(wait)}
  end
  if holder and holder == waiter then redis.call('DEL', KEYS[7]) end
end
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease * 2)
local keep = math.ceil(window + 2 * bucket_ms)
if rpm > 0 then
  redis.call('HINCRBY', KEYS[2], bucket, 1)
  redis.call('PEXPIRE', KEYS[2], keep)
end
if tpm > 0 then
  redis.call('HINCRBY', KEYS[3], bucket, tokens)
  redis.call('PEXPIRE', KEYS[3], keep)
end
-- grants per 200 ms over the last 10 s: the rate a line of waiting jobs is served at
local grant_bucket = math.floor(now / 200)
redis.call('HINCRBY', KEYS[5], grant_bucket, 1)
redis.call('PEXPIRE', KEYS[5], 11000)
if redis.call('HLEN', KEYS[5]) > 60 then
  local fields = redis.call('HKEYS', KEYS[5])
  for i = 1, #fields do
    if tonumber(fields[i]) < grant_bucket - 50 then redis.call('HDEL', KEYS[5], fields[i]) end
  end
end
if ARGV[11] ~= '' then redis.call('ZREM', KEYS[6], ARGV[11]) end
return {1, bucket, tokens}
"""

# KEYS: waiters, grants, tpm_hold; ARGV: job id, shortest defer ms, longest defer ms, hold ms.
# A job handed back joins the scope's waiters, due when the calls granted lately (the rate over
# the last 10 s) would have served the waiters ahead of it: a long line waits long, instead of
# every waiting job coming back (and being refused again) every fraction of a second. A job
# handed back again keeps its place in the line. A job holding the scope's tpm_hold is first in
# line for tokens: it is due as soon as there may be room (the shortest defer), and keeps the
# hold until then (and hold ms more).
# Returns the defer in ms.
_DEFER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local shortest, longest = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - longest)
-- a job already in line keeps its place (those due before it); a new one goes to the end
local place = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
local ahead
if place then
  ahead = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. place)
else
  ahead = redis.call('ZCARD', KEYS[1])
end
local bucket_ms = 200
local oldest = math.floor(now / bucket_ms) - 50
local granted, first = 0, nil
local fields = redis.call('HGETALL', KEYS[2])
for i = 1, #fields, 2 do
  local b = tonumber(fields[i])
  if b >= oldest then
    granted = granted + tonumber(fields[i + 1])
    if first == nil or b < first then first = b end
  end
end
local defer = shortest
local holder = redis.call('HGET', KEYS[3], 'id') == ARGV[1]
if granted > 0 and not holder then
  -- the rate over the time grants were seen, not the whole window (it may have just begun)
  local span = math.max(bucket_ms, now - first * bucket_ms)
  -- a little early rather than late: the line must never run dry while calls could start
  defer = math.max(shortest, math.floor(0.8 * ahead * span / granted))
end
defer = math.min(defer, longest)
redis.call('ZADD', KEYS[1], now + defer, ARGV[1])
redis.call('PEXPIRE', KEYS[1], longest * 3)
if holder then
  redis.call('PEXPIRE', KEYS[3], defer + tonumber(ARGV[4]))
end
return defer
"""

# KEYS: inflight; ARGV: lease ms, permit ids... Returns how many permits were still held.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local held = 0
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) > now then
    redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
    held = held + 1
  end
end
if held > 0 then redis.call('PEXPIRE', KEYS[1], lease * 2) end
return held
"""

# KEYS: inflight, rpm, tpm, freed channel; ARGV: permit id, bucket, requests to give back
# (0/1), token delta, scope. Corrections go to the bucket the permit was counted in, if that is
# still in the window. A permit that was held is announced on the freed channel (the scope's
# name), so that calls waiting in any worker try again at once.
_RELEASE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('PUBLISH', KEYS[4], ARGV[5])
end
local bucket, requests, tokens = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if requests ~= 0 and redis.call('HEXISTS', KEYS[2], bucket) == 1 then
  redis.call('HINCRBY', KEYS[2], bucket, -requests)
end
if tokens ~= 0 and redis.call('HEXISTS', KEYS[3], bucket) == 1 then
  redis.call('HINCRBY', KEYS[3], bucket, tokens)
end
return 1
"""

# KEYS: aimd, inflight; ARGV: min, max, initial, latency ms (-1: none), overload (1/0),
#       decrease factor, latency ratio, memory ms.
# Windowed AIMD: observations add up in the current window; once it holds max(MIN_SAMPLES,
# limit) calls it is judged once: repeated overload (or a latency rise) multiplies the limit
# by the factor; a clean window in which the calls in flight reached the limit adds one (an
# unused limit is not raised). Returns the limit (as a string: Lua drops fractions). What was
# learnt lapses after `memory ms` without a call: the backend may have changed meanwhile.
_OBSERVE = """
local lo, hi = tonumber(ARGV[1]), tonumber(ARGV[2])
local factor, ratio = tonumber(ARGV[6]), tonumber(ARGV[7])
local latency, overload = tonumber(ARGV[4]), tonumber(ARGV[5])
local stored = tonumber(redis.call('HGET', KEYS[1], 'limit'))
local limit = stored or tonumber(ARGV[3])
-- bounds may have changed since it was stored (a new config): the limit always lies in them
limit = math.max(lo, math.min(hi, limit))
if stored ~= nil and stored ~= limit then redis.call('HSET', KEYS[1], 'limit', tostring(limit)) end
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[8]))
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local busy = redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
local peak = tonumber(redis.call('HGET', KEYS[1], 'peak')) or 0
if busy > peak then
  peak = busy
  redis.call('HSET', KEYS[1], 'peak', peak)
end
local bad = redis.call('HINCRBY', KEYS[1], 'overloads', overload)
local lat_n, lat_sum = 0, 0
if latency >= 0 then
  lat_n = redis.call('HINCRBY', KEYS[1], 'lat_n', 1)
  lat_sum = tonumber(redis.call('HINCRBYFLOAT', KEYS[1], 'lat_sum', latency))
else
  lat_n = tonumber(redis.call('HGET', KEYS[1], 'lat_n')) or 0
  lat_sum = tonumber(redis.call('HGET', KEYS[1], 'lat_sum')) or 0
end
if n < math.max(5, math.floor(limit)) then return tostring(limit) end
local best = tonumber(redis.call('HGET', KEYS[1], 'best_ms'))
local mean = nil
if lat_n > 0 then mean = lat_sum / lat_n end
local slow = best ~= nil and mean ~= nil and lat_n >= 3 and mean > best * ratio
if (bad >= 2 and bad >= 0.1 * n) or slow then
  limit = limit * factor
  redis.call('HINCRBY', KEYS[1], 'decreases', 1)
elseif bad == 0 and peak >= math.floor(limit) then
  limit = limit + 1
end
limit = math.max(lo, math.min(hi, limit))
if mean ~= nil and not slow then
  if best == nil or mean < best then best = mean else best = best * 0.9 + mean * 0.1 end
  redis.call('HSET', KEYS[1], 'best_ms', tostring(best))
end
redis.call('HSET', KEYS[1], 'limit', tostring(limit), 'n', 0, 'overloads', 0)
redis.call('HSET', KEYS[1], 'lat_n', 0, 'lat_sum', 0, 'peak', 0)
redis.call('HINCRBY', KEYS[1], 'windows', 1)
return tostring(limit)
"""


@dataclass(frozen=True, slots=True)
class ScopeLimits:
    """The limits of one scope, as the scripts take them (None: no such limit)."""

    max_in_flight: int | None = None
    rpm_per_window: int | None = None
    tpm_per_window: int | None = None
    window_s: float = 60.0
    adaptive: bool = False
    min_in_flight: int = 1
    initial_in_flight: int = 1
    decrease_factor: float = 0.9
    latency_ratio: float = 2.0


@dataclass(frozen=True, slots=True)
class Grant:
    """The answer of one acquire: granted (with the bucket it counted in) or a wait hint."""

    granted: bool
    bucket: int = 0
    #: Tokens reserved: those asked for, at most the whole tpm budget.
    tokens: int = 0
    #: What is full (`max_in_flight`, `rpm`, `tpm`) and when it may have room, if not granted.
    reason: str = ""
    wait_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ScopeState:
    """What Redis says about one scope right now (for `promptq endpoints` and metrics)."""

    scope: str
    in_flight: int
    #: The adaptive in-flight limit (fractional: it moves in small steps), if adaptive.
    adaptive_limit: float | None
    #: Requests and tokens counted in the current rate window.
    requests_in_window: int
    tokens_in_window: int
    #: How many times the adaptive limit was lowered.
    decreases: int
    #: Jobs handed back to the queue that wait for this scope (due now or later).
    waiting: int = 0


class RedisLimits:
    """The Lua scripts of the limiter, bound to one Redis and one key prefix."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._observe = redis.register_script(_OBSERVE)
        self._defer = redis.register_script(_DEFER)

    @property
    def freed_channel(self) -> str:
        """The pub/sub channel on which released permits are announced (by scope name).

        Redis pub/sub ignores the database number, so it is part of the name: deployments that
        share one Redis on different databases do not wake each other's waiting calls."""
        db = self.redis.connection_pool.connection_kwargs.get("db", 0)
        return f"{self.prefix}:limits:freed:{db}"

    def keys(self, scope: str) -> list[str]:
        """The scope's keys: inflight, rpm, tpm, aimd, grants, waiters, tpm_hold."""
        base = f"{self.prefix}:limits:{scope}"
        names = ("inflight", "rpm", "tpm", "aimd", "grants", "waiters", "tpm_hold")
        return [f"{base}:{name}" for name in names]

    async def acquire(
        self,
        scope: str,
        limits: ScopeLimits,
        *,
        permit_id: str,
        lease_s: float,
        tokens: int,
        job_id: str = "",
        waiter: str = "",
    ) -> Grant:
        """Take a permit for one call counting `tokens` (at most the whole tpm budget), if
        every limit allows it now (and take `job_id` off the scope's waiters).

        `waiter` names the call across its tries (default: `job_id`; none: it takes no place
        in line): the first call refused for tokens holds its place, and later calls leave
        room for it until it has its permit (or stops trying for HOLD_S).
        """
        result: list[Any] = await self._acquire(
            keys=self.keys(scope),
            args=[
                permit_id,
                _ms(lease_s),
                limits.max_in_flight or 0,
                1 if limits.adaptive else 0,
                limits.min_in_flight,
                limits.initial_in_flight,
                limits.rpm_per_window or 0,
                limits.tpm_per_window or 0,
                max(0, tokens),
                _ms(limits.window_s),
                job_id,
                waiter or job_id,
                _ms(HOLD_S),
                _ms(ADAPTIVE_MEMORY_S),
            ],
        )
        if int(result[0]) == 1:
            return Grant(True, bucket=int(result[1]), tokens=int(result[2]))
        return Grant(False, reason=_text(result[1]), wait_s=int(result[2]) / 1000)

    async def defer(self, scope: str, job_id: str, *, shortest_s: float, longest_s: float) -> float:
        """Put a job handed back in the scope's line; returns in how many seconds it is due."""
        keys = self.keys(scope)
        defer_ms = await self._defer(
            keys=[keys[5], keys[4], keys[6]],
            args=[job_id, _ms(shortest_s), _ms(longest_s), _ms(HOLD_S)],
        )
        return int(defer_ms) / 1000

    async def renew(self, scope: str, permit_ids: list[str], *, lease_s: float) -> int:
        """Extend the leases of permits still held; returns how many were."""
        if not permit_ids:
            return 0
        held = await self._renew(keys=self.keys(scope)[:1], args=[_ms(lease_s), *permit_ids])
        return int(held)

    async def release(
        self, scope: str, permit_id: str, *, bucket: int, refund_request: bool, token_delta: int
    ) -> None:
        """Give a permit back; correct its bucket by `token_delta` tokens (actual minus
        reserved) and, for a call never made, give its request back too."""
        await self._release(
            keys=[*self.keys(scope)[:3], self.freed_channel],
            args=[permit_id, bucket, 1 if refund_request else 0, token_delta, scope],
        )

    async def observe(
        self, scope: str, limits: ScopeLimits, *, latency_s: float | None, overload: bool
    ) -> float:
        """Record one call's outcome in the adaptive window; returns the adaptive limit.

        Call it while the call's permit is still held: the calls in flight then include it.
        """
        result = await self._observe(
            keys=[self.keys(scope)[3], self.keys(scope)[0]],
            args=[
                limits.min_in_flight,
                limits.max_in_flight or limits.min_in_flight,
                limits.initial_in_flight,
                -1 if latency_s is None else round(latency_s * 1000, 3),
                1 if overload else 0,
                limits.decrease_factor,
                limits.latency_ratio,
                _ms(ADAPTIVE_MEMORY_S),
            ],
        )
        return float(_text(result))

    async def state(
        self, scope: str, limits: ScopeLimits | None = None, *, window_s: float | None = None
    ) -> ScopeState:
        """The scope's current in-flight count, adaptive limit and window usage.

        With `limits` (the scope's config now), the adaptive limit is reported only if it is
        adaptive, within its bounds as the scripts apply them (a value stored under another
        config is not shown raw); without, as stored. The window is `window_s`, else that of
        `limits`, else 60 s.
        """
        if window_s is None:
            window_s = limits.window_s if limits is not None else 60.0
        inflight, rpm, tpm, aimd, _, waiters, _ = self.keys(scope)
        now_ms = await self._now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcount(inflight, f"({now_ms}", "+inf")
            pipe.hgetall(rpm)
            pipe.hgetall(tpm)
            pipe.hmget(aimd, ["limit", "decreases"])
            pipe.zcard(waiters)
            count, rpm_buckets, tpm_buckets, (limit, decreases), waiting = await pipe.execute()
        cutoff = now_ms - _ms(window_s)
        adaptive = None if limit is None else float(_text(limit))
        if limits is not None:
            adaptive = _adaptive_limit(adaptive, limits)
        return ScopeState(
            scope=scope,
            in_flight=int(count),
            adaptive_limit=adaptive,
            requests_in_window=_window_sum(rpm_buckets, cutoff),
            tokens_in_window=_window_sum(tpm_buckets, cutoff),
            decreases=int(decreases or 0),
            waiting=int(waiting),
        )

    async def _now_ms(self) -> int:
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000


def _adaptive_limit(stored: float | None, limits: ScopeLimits) -> float | None:
    """The adaptive limit as the scripts apply it: None unless adaptive, else the stored
    value (the initial one if none) within [min_in_flight, max_in_flight]."""
    if not limits.adaptive:
        return None
    value = limits.initial_in_flight if stored is None else stored
    high = limits.max_in_flight or limits.min_in_flight
    return float(max(limits.min_in_flight, min(high, value)))


def _window_sum(buckets: dict[Any, Any], cutoff: int) -> int:
    """Counts of the buckets that end after `cutoff` (fields of another format are ignored)."""
    total = 0
    for key, value in buckets.items():
        try:
            if int(key) > cutoff:
                total += int(value)
        except ValueError:
            continue
    return total


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
