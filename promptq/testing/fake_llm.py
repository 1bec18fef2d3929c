"""Scriptable fake OpenAI-compatible LLM served over real HTTP (aiohttp)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import random
import re
import selectors
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from aiohttp import web

logger = logging.getLogger(__name__)

DIRECTIVE_RE = re.compile(r"\[\[\s*fake\s*:(.*?)\]\]", re.DOTALL)
CONTEXT_LIMIT = 8192
_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request (simulated).", "invalid_request_error", None),
    401: ("Incorrect API key provided (simulated).", "authentication_error", "invalid_api_key"),
    403: ("Permission denied for this model (simulated).", "permission_error", None),
    404: ("The model does not exist (not found).", "invalid_request_error", "model_not_found"),
    408: ("Request timed out (simulated).", "timeout_error", None),
    409: ("Conflict while processing the request (simulated).", "conflict_error", None),
    422: ("Unprocessable request (simulated).", "invalid_request_error", None),
    429: ("Rate limit reached", "rate_limit_error", "rate_limit_exceeded"),
    500: ("The server had an error processing your request (simulated).", "server_error", None),
    502: ("Bad gateway (simulated).", "server_error", None),
    503: ("The engine is currently overloaded (simulated).", "server_error", None),
    504: ("Gateway timeout (simulated).", "server_error", None),
}
_PLAIN_STEPS = {
    "ok",
    "hang",
    "drop",
    "malformed",
    "empty",
    "nochoices",
    "stream_drop",
    "context",
    "nul",
}
_STEP_HEADERS = {"retry_after": "Retry-After", "retry_after_ms": "retry-after-ms"}
_FLOAT_FIELDS = ("latency_ms", "jitter", "hang_s", "stream_chunk_delay_ms")
_CONFIG_FIELDS = frozenset(
    {
        *_FLOAT_FIELDS,
        "seed",
        "fail_rates",
        "capacity",
        "models",
        "context_window_tokens",
        "chars_per_token",
    }
)


def count_tokens(text: str) -> int:
    """Count whitespace-separated words (the fake tokenizer)."""
    return len(text.split())


def _text(content: object) -> str:
    """Flatten message content (a string or a list of text parts) to a string."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "\n".join(p for p in parts if isinstance(p, str))
    return ""


def _last_user(messages: list[dict[str, Any]]) -> str:
    """Return the content of the last user message, or "" if there is none."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text(message.get("content"))
    return ""


def _prompt_tokens(messages: list[dict[str, Any]], chars_per_token: float | None = None) -> int:
    """Fake prompt token count: words (or characters / chars_per_token, rounded up) of every
    message plus 3 per message."""
    if chars_per_token is None:
        return sum(count_tokens(_text(m.get("content"))) + 3 for m in messages)
    return sum(math.ceil(len(_text(m.get("content"))) / chars_per_token) + 3 for m in messages)


def expected_reply(model: str, messages: list[dict[str, Any]]) -> str:
    """Return the deterministic reply content the server gives for these messages."""
    last = _last_user(messages)
    digest = hashlib.sha256(f"{model}\n{last}".encode()).hexdigest()[:12]
    echo = " ".join(DIRECTIVE_RE.sub(" ", last).split())[:200]
    return " ".join(f"[{model}] reply {digest}: {echo}".split())


@dataclass(frozen=True)
class _Step:
    kind: str
    status: int = 200
    sleep_ms: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()
    #: echo_auth_raw: characters of filler before the echoed Authorization header.
    pad: int = 0


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _non_negative(text: str) -> bool:
    try:
        return 0 <= float(text) < math.inf
    except ValueError:
        return False


def _parse_step(text: str) -> _Step:
    """Parse one directive step such as ``429:retry_after=1`` (ValueError if invalid)."""
    name, _, arg = (s.strip() for s in text.strip().partition(":"))
    name = name.lower()
    if name == "sleep" and _non_negative(arg):
        return _Step("sleep", sleep_ms=float(arg))
    if name.isdigit() and int(name) in _ERRORS:
        headers = []
        for part in filter(None, (p.strip() for p in arg.split(";"))):
            key, sep, value = (s.strip() for s in part.partition("="))
            if not sep or key not in _STEP_HEADERS or not _non_negative(value):
                raise ValueError(f"bad parameter {part!r} in fake step {text!r}")
            headers.append((_STEP_HEADERS[key], value))
        return _Step("status", status=int(name), headers=tuple(headers))
    if name in _PLAIN_STEPS and not arg:
        return _Step(name)
    if name == "echo_auth" and not arg:
        return _Step(name, status=401)
    if name == "echo_auth_raw" and (not arg or arg.isdigit()):
        return _Step(name, status=502, pad=int(arg or 0))
    raise ValueError(f"unknown or malformed fake step {text!r}")


def _parse_directive(content: str) -> list[_Step] | None:
    """Return the scripted steps of a ``[[fake: ...]]`` directive, or None if absent."""
    match = DIRECTIVE_RE.search(content)
    if match is None:
        return None
    steps = [_parse_step(s) for s in match.group(1).split(",") if s.strip()]
    return steps or [_Step("ok")]


def _check_config(values: object) -> dict[str, Any]:
    """Validate a (partial) config mapping and return it normalised; ValueError if bad."""
    if not isinstance(values, dict):
        raise ValueError("config must be a JSON object")
    if unknown := sorted(map(str, values.keys() - _CONFIG_FIELDS)):
        raise ValueError(f"unknown config fields: {unknown}")
    out = dict(values)
    for name, value in values.items():
        if name in _FLOAT_FIELDS:
            ok = _is_number(value) and 0 <= value <= (1 if name == "jitter" else math.inf)
            out[name] = float(value) if ok else value
        elif name in ("seed", "capacity", "context_window_tokens"):
            ok = value is None or (type(value) is int and (name == "seed" or value >= 1))
        elif name == "chars_per_token":
            ok = value is None or (_is_number(value) and value > 0)
        elif name == "models":
            ok = isinstance(value, list) and all(isinstance(m, str) and m for m in value)
            ok = ok and bool(value)
        else:  # fail_rates: {step: probability}, probabilities summing to at most 1
            ok = isinstance(value, dict) and all(_is_number(r) and r >= 0 for r in value.values())
            ok = ok and sum(value.values()) <= 1 + 1e-9
            if ok:
                for step in value:
                    _parse_step(str(step))  # raises ValueError for unknown steps
                out[name] = {str(k): float(v) for k, v in value.items()}
        if not ok:
            raise ValueError(f"invalid value for {name}: {value!r}")
    return out


@dataclass
class FakeLLMConfig:
    """Behaviour knobs of the fake LLM server (mutable at runtime)."""

    latency_ms: float = 0.0
    jitter: float = 0.0
    seed: int | None = None
    fail_rates: dict[str, float] = field(default_factory=dict)
    capacity: int | None = None
    hang_s: float = 3600.0
    models: list[str] = field(default_factory=lambda: ["fake-small", "fake-large"])
    stream_chunk_delay_ms: float = 0.0
    #: Simulate Ollama's silent truncation: a longer prompt still gets a 200, but the usage
    #: reports at most this many prompt tokens (what the model really read).
    context_window_tokens: int | None = None
    #: Count prompt tokens as characters / this (like a real tokenizer) instead of as words.
    chars_per_token: float | None = None

    def __post_init__(self) -> None:
        """Validate all fields, raising ValueError on bad values."""
        _check_config(dataclasses.asdict(self))


@dataclass
class FakeLLMStats:
    """Live counters of what the fake server has received and answered."""

    total_requests: int = 0
    requests_by_prompt: dict[str, int] = field(default_factory=dict)
    #: The last user message of every request, in arrival order (who went before whom).
    arrivals: list[str] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: int = 0
    request_times: list[float] = field(default_factory=list)
    responses_by_status: dict[int, int] = field(default_factory=dict)
    authorization_headers: set[str] = field(default_factory=set)
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    #: Latency the server added before answering, summed over requests (benchmarks' ideal).
    latency_ms_total: float = 0.0
    #: Time requests spent in flight (arrival to answer), summed: how busy the "model" was.
    busy_ms_total: float = 0.0
    #: Requests whose prompt was longer than `context_window_tokens` (and silently cut).
    truncated_requests: int = 0
    #: (start, end) of every request's time in flight, monotonic seconds (see busy_ms_total).
    spans: list[tuple[float, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable snapshot (sets sorted, status keys as strings)."""
        data = dataclasses.asdict(self)
        data["authorization_headers"] = sorted(self.authorization_headers)
        data["responses_by_status"] = {
            str(k): n for k, n in sorted(self.responses_by_status.items())
        }
        return data

    def reset(self) -> None:
        """Clear every counter in place, keeping in_flight (those requests still run)."""
        fresh = FakeLLMStats(in_flight=self.in_flight, peak_in_flight=self.in_flight)
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(fresh, f.name))


@dataclass
class FakeLLMState:
    """Per-application mutable state of the fake server."""

    config: FakeLLMConfig
    stats: FakeLLMStats = field(default_factory=FakeLLMStats)
    rng: random.Random = field(default_factory=random.Random)
    step_counts: dict[str, int] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    closing: asyncio.Event = field(default_factory=asyncio.Event)

    def reset(self) -> None:
        """Clear stats and per-prompt step counters; reseed the RNG if a seed is set."""
        self.stats.reset()
        self.step_counts.clear()
        if self.config.seed is not None:
            self.rng.seed(self.config.seed)

    def record(self, status: int) -> None:
        """Count one response with ``status`` (0 means the connection was dropped)."""
        self.stats.responses_by_status[status] = self.stats.responses_by_status.get(status, 0) + 1

    def tally(self, usage: dict[str, int]) -> None:
        """Add a successful response's usage to the token totals."""
        self.stats.prompt_tokens_total += usage["prompt_tokens"]
        self.stats.completion_tokens_total += usage["completion_tokens"]

    def note_arrival(self) -> None:
        """Wake everything waiting for the request counter to change."""
        event, self.arrived = self.arrived, asyncio.Event()
        event.set()


FAKE_LLM_STATE = web.AppKey("promptq_fake_llm_state", FakeLLMState)


@dataclass(frozen=True)
class _ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    max_tokens: int | None


def _parse_request(raw: bytes) -> _ChatRequest:
    """Validate a chat completion request body, raising ValueError with an API message."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise ValueError("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise ValueError("The request body must be a JSON object.")
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not model:
        raise ValueError("You must provide a model parameter.")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty array.")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise ValueError("Each message must be an object with a string 'role'.")
    stream = body.get("stream") or False
    limit = body.get("max_tokens")
    limit = body.get("max_completion_tokens") if limit is None else limit
    if not isinstance(stream, bool) or not (limit is None or (type(limit) is int and limit > 0)):
        raise ValueError("'stream' must be a boolean and 'max_tokens' a positive integer.")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return _ChatRequest(model, messages, stream, include_usage, limit)


def _respond(
    state: FakeLLMState, status: int, body: bytes, headers: dict[str, str] | None = None
) -> web.Response:
    state.record(status)
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def _error(
    state: FakeLLMState,
    status: int,
    *,
    message: str | None = None,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    default, kind, default_code = _ERRORS.get(status, ("Error (simulated).", "server_error", None))
    error = {
        "message": message or default,
        "type": kind,
        "param": param,
        "code": code or default_code,
    }
    return _respond(state, status, json.dumps({"error": error}).encode(), headers)


def _drop(
    request: web.Request, state: FakeLLMState, resp: web.StreamResponse | None = None
) -> web.StreamResponse:
    """Close the connection; aiohttp then fails to write the response and gives up quietly."""
    state.record(0)
    if request.transport is not None:
        request.transport.close()
    return resp if resp is not None else web.Response(status=599)


def _completion(
    state: FakeLLMState, req: _ChatRequest, *, nul: bool = False
) -> tuple[str, str, dict[str, int]]:
    """Return (reply, finish_reason, usage) for a successful request; with `nul` the reply
    holds a NUL character (valid JSON, `\\u0000`, but no database stores it)."""
    reply, finish = expected_reply(req.model, req.messages), "stop"
    if nul:
        reply = reply.replace(" ", " \x00", 1)
    words = reply.split()
    if req.max_tokens is not None and len(words) > req.max_tokens:
        reply, finish = " ".join(words[: req.max_tokens]), "length"
    prompt = _prompt_tokens(req.messages, state.config.chars_per_token)
    window = state.config.context_window_tokens
    if window is not None and prompt > window:
        prompt = window  # what Ollama's /v1 does: read only what fits, answer 200 anyway
        state.stats.truncated_requests += 1
    completion = count_tokens(reply)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    return reply, finish, {**usage, "total_tokens": prompt + completion}


def _header(req: _ChatRequest, kind: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": kind,
        "created": int(time.time()),
        "model": req.model,
    }


async def _stream(
    request: web.Request, state: FakeLLMState, req: _ChatRequest, drop: bool, nul: bool
) -> web.StreamResponse:
    """Send the reply as SSE chunks; with ``drop`` close the connection after two chunks."""
    reply, finish, usage = _completion(state, req, nul=nul)
    head = _header(req, "chat.completion.chunk")
    deltas: list[tuple[dict[str, str], str | None]] = [({"role": "assistant", "content": ""}, None)]
    deltas += [({"content": w if i == 0 else " " + w}, None) for i, w in enumerate(reply.split())]
    deltas.append(({}, finish))
    events = [
        {**head, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": f}]}
        for d, f in deltas
    ]
    if req.include_usage:
        events.append({**head, "choices": [], "usage": usage})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    try:
        for i, event in enumerate(events):
            if drop and i == 2:
                return _drop(request, state, resp)
            if i and state.config.stream_chunk_delay_ms > 0:
                await asyncio.sleep(state.config.stream_chunk_delay_ms / 1000)
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
    except ConnectionError:
        logger.debug("fake LLM: client went away mid-stream")
        return resp
    state.record(200)
    state.tally(usage)
    return resp


async def _hang(state: FakeLLMState) -> bool:
    """Wait hang_s seconds; return True if the server began shutting down first."""
    try:
        async with asyncio.timeout(state.config.hang_s):
            await state.closing.wait()
    except TimeoutError:
        return False
    return True


def _pick_step(state: FakeLLMState, key: str) -> _Step:
    """Choose the step for this request: the scripted one, else a random failure or ok."""
    steps = _parse_directive(key)
    if steps is not None:
        n = state.step_counts[key] = state.step_counts.get(key, 0) + 1
        return steps[min(n, len(steps)) - 1]
    draw = state.rng.random()
    for name, rate in state.config.fail_rates.items():
        draw -= rate
        if draw < 0:
            return _parse_step(name)
    return _Step("ok")


async def _run_step(
    request: web.Request, state: FakeLLMState, req: _ChatRequest, step: _Step
) -> web.StreamResponse:
    """Execute one step after the configured (or scripted) latency."""
    cfg = state.config
    delay_ms = step.sleep_ms if step.kind == "sleep" else cfg.latency_ms
    if step.kind != "sleep" and cfg.jitter > 0 and delay_ms > 0:
        delay_ms *= 1 + cfg.jitter * state.rng.uniform(-1.0, 1.0)
    if delay_ms > 0:
        state.stats.latency_ms_total += delay_ms
        await asyncio.sleep(delay_ms / 1000)
    kind = step.kind
    if kind == "hang" and await _hang(state):
        return _drop(request, state)
    if kind == "status":
        missing = f"The model `{req.model}` does not exist or you do not have access to it."
        message = missing if step.status == 404 else None
        return _error(state, step.status, message=message, headers=dict(step.headers))
    if kind == "echo_auth":  # like a provider that quotes the key it rejected
        quoted = request.headers.get("Authorization", "(none)")
        return _error(state, 401, message=f"Incorrect API key provided: {quoted}.")
    if kind == "echo_auth_raw":  # like a proxy that dumps the request headers as text
        first = sorted(request.headers.items(), key=lambda kv: kv[0].lower() != "authorization")
        headers = "\n".join(f"{k}: {v}" for k, v in first)
        state.record(step.status)
        return web.Response(status=step.status, text="x" * step.pad + "\n" + headers)
    if kind == "context":
        tokens = max(_prompt_tokens(req.messages, cfg.chars_per_token), CONTEXT_LIMIT + 1)
        message = (
            f"This model's maximum context length is {CONTEXT_LIMIT} tokens. However, your "
            f"messages resulted in {tokens} tokens. Please reduce the length of the messages."
        )
        return _error(state, 400, message=message, code="context_length_exceeded", param="messages")
    if kind == "drop" or (kind == "stream_drop" and not req.stream):
        return _drop(request, state)
    if kind == "malformed":
        return _respond(state, 200, b'{"id": "chatcmpl-x", "choices": [')
    if kind == "empty":
        return _respond(state, 200, b"")
    if kind == "nochoices":
        return _respond(state, 200, json.dumps(_header(req, "chat.completion")).encode())
    if req.stream:
        return await _stream(request, state, req, drop=kind == "stream_drop", nul=kind == "nul")
    reply, finish, usage = _completion(state, req, nul=kind == "nul")
    answer = {"role": "assistant", "content": reply}
    choice = {"index": 0, "message": answer, "logprobs": None, "finish_reason": finish}
    state.tally(usage)
    body = {**_header(req, "chat.completion"), "choices": [choice], "usage": usage}
    return _respond(state, 200, json.dumps(body).encode())


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[FAKE_LLM_STATE]
    stats = state.stats
    arrival = time.monotonic()
    raw = await request.read()
    stats.total_requests += 1
    stats.request_times.append(arrival)
    if (auth := request.headers.get("Authorization")) is not None:
        stats.authorization_headers.add(auth)
    try:
        req = _parse_request(raw)
    except ValueError as exc:
        state.note_arrival()
        return _error(state, 400, message=str(exc))
    key = _last_user(req.messages)
    stats.requests_by_prompt[key] = stats.requests_by_prompt.get(key, 0) + 1
    stats.arrivals.append(key)
    capacity = state.config.capacity
    if capacity is not None and stats.in_flight >= capacity:
        state.note_arrival()
        return _error(state, 429, headers={"Retry-After": "1"})
    stats.in_flight += 1
    stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
    started = time.monotonic()
    try:
        state.note_arrival()
        try:
            step = _pick_step(state, key)
        except ValueError as exc:
            return _error(state, 400, message=str(exc))
        return await _run_step(request, state, req, step)
    finally:
        stats.in_flight -= 1
        ended = time.monotonic()
        stats.busy_ms_total += (ended - started) * 1000
        stats.spans.append((started, ended))


async def _models(request: web.Request) -> web.Response:
    models = request.app[FAKE_LLM_STATE].config.models
    data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"} for m in models]
    return web.json_response({"object": "list", "data": data})


async def _get_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[FAKE_LLM_STATE].stats.to_dict())


async def _reset(request: web.Request) -> web.Response:
    request.app[FAKE_LLM_STATE].reset()
    return web.json_response({"reset": True})


async def _get_config(request: web.Request) -> web.Response:
    return web.json_response(dataclasses.asdict(request.app[FAKE_LLM_STATE].config))


async def _set_config(request: web.Request) -> web.Response:
    state = request.app[FAKE_LLM_STATE]
    try:
        updates = _check_config(json.loads(await request.read()))
    except ValueError as exc:
        error = {"message": str(exc), "type": "invalid_request_error", "param": None, "code": None}
        return web.json_response({"error": error}, status=400)
    for name, value in updates.items():
        setattr(state.config, name, value)
    if updates.get("seed") is not None:
        state.rng.seed(updates["seed"])
    return web.json_response(dataclasses.asdict(state.config))


async def _on_shutdown(app: web.Application) -> None:
    app[FAKE_LLM_STATE].closing.set()


def create_fake_llm_app(config: FakeLLMConfig | None = None) -> web.Application:
    """Build the aiohttp application implementing the fake OpenAI-compatible API."""
    config = config if config is not None else FakeLLMConfig()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[FAKE_LLM_STATE] = FakeLLMState(config=config, rng=random.Random(config.seed))
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/_fake/stats", _get_stats)
    app.router.add_post("/_fake/reset", _reset)
    app.router.add_get("/_fake/config", _get_config)
    app.router.add_post("/_fake/config", _set_config)
    app.on_shutdown.append(_on_shutdown)
    return app


class FakeLLM:
    """Async context manager running the fake LLM on a real (by default ephemeral) TCP port."""

    def __init__(
        self, config: FakeLLMConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        """Prepare (but do not start) a server for ``config`` on ``host:port``."""
        self.config = config if config is not None else FakeLLMConfig()
        self.host = host
        self.port = port
        self.app = create_fake_llm_app(self.config)
        self._state = self.app[FAKE_LLM_STATE]
        self._runner: web.AppRunner | None = None

    @property
    def stats(self) -> FakeLLMStats:
        """The live stats object (mutated in place by the server)."""
        return self._state.stats

    @property
    def url(self) -> str:
        """Root URL of the server, e.g. ``http://127.0.0.1:8123``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, e.g. ``http://127.0.0.1:8123/v1``."""
        return f"{self.url}/v1"

    async def start(self) -> None:
        """Bind the port and start serving."""
        runner = web.AppRunner(
            self.app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop serving; hanging requests are released and their connections dropped."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeLLM:
        """Start the server and return self."""
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop the server."""
        await self.stop()

    def reset(self) -> None:
        """Clear stats and per-prompt step counters."""
        self._state.reset()

    async def wait_for_requests(self, n: int, timeout_s: float = 10.0) -> None:
        """Wait until at least ``n`` chat requests have arrived, else raise TimeoutError."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.stats.total_requests < n:
                    await self._state.arrived.wait()
        except TimeoutError:
            raise TimeoutError(
                f"fake LLM saw {self.stats.total_requests} of {n} requests in {timeout_s}s"
            ) from None


def exact_timer_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers keep microseconds, for a fake whose latencies must be exact.

    asyncio's default loop waits in epoll, whose timeout is whole milliseconds rounded up: each
    injected latency ends up to 1 ms late (0.5 ms on average, 2% of a 25 ms call), which a
    benchmark would blame on the client. select(2) takes microseconds; it watches at most
    ~1,000 connections.
    """
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


async def serve(host: str, port: int, config: FakeLLMConfig) -> None:
    """Run the fake LLM until cancelled, printing its base URL once it is listening."""
    async with FakeLLM(config, host=host, port=port) as llm:
        logger.info("fake LLM listening on %s", llm.base_url)
        print(f"fake LLM listening on {llm.base_url}", flush=True)
        await asyncio.Event().wait()
