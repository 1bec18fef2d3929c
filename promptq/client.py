"""A small async Python client for the promptq HTTP API.

async with PromptQClient("http://127.0.0.1:8000", api_key="pq_...") as pq:
    job = await pq.submit_prompt("Say hello", model="llama3.2")
    done = await pq.wait(job["id"])
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from promptq.errors import (
    BatchTooLarge,
    DocumentTooLarge,
    IdempotencyConflict,
    InvalidBatch,
    InvalidRequest,
    JobNotRetryable,
    LimitExceeded,
    NotCancellable,
    NotFound,
    PromptQError,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedDocument,
)
from promptq.sse import ServerEvent, parse_events

#: Longest silence of a job's event stream before the client gives up on it: the server
#: writes a keep-alive comment every 15 s (api.stream.KEEPALIVE_S).
STREAM_SILENCE_S = 60.0
#: Statuses after which a job never changes again.
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})

_BY_STATUS: dict[int, type[PromptQError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: NotFound,
    409: IdempotencyConflict,
    413: InvalidRequest,
    422: InvalidRequest,
    503: ServiceUnavailable,
}

#: The API's error codes that name an exception of promptq.errors; they win over the status.
_BY_CODE: dict[str, type[PromptQError]] = {
    kind.code: kind
    for kind in (
        IdempotencyConflict,
        JobNotRetryable,
        NotCancellable,
        BatchTooLarge,
        InvalidBatch,
        DocumentTooLarge,
        LimitExceeded,
        UnsupportedDocument,
    )
}

Job = dict[str, Any]
#: Called by `wait` with the job whenever its status, attempts or progress change.
ProgressCallback = Callable[[Job], Awaitable[None] | None]


class PromptQClient:
    """Submit jobs and read them back over HTTP. Jobs are returned as plain dicts."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # A key read from a file or the environment may end in a newline.
        api_key = api_key.strip() if api_key else None
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> PromptQClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session if this client opened it."""
        if self._session is not None and self._owns_session:
            await self._session.close()
            self._session = None

    async def submit(self, body: dict[str, Any]) -> Job:
        """POST a raw job request (`{"kind": ...}`) and return the job."""
        job: Job = await self._request("POST", "/api/jobs", json=body)
        return job

    async def submit_prompt(
        self,
        prompt: str | list[dict[str, Any]],
        *,
        model: str | None = None,
        params: dict[str, Any] | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        deadline_s: float | None = None,
    ) -> Job:
        """Submit a chat completion: a user prompt string or a full `messages` list."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        body: dict[str, Any] = {"kind": "prompt", "messages": messages}
        return await self.submit(
            _with_options(body, model, params, max_attempts, idempotency_key, deadline_s)
        )

    async def submit_summarize(
        self,
        document: str,
        *,
        instructions: str | None = None,
        style: str | None = None,
        target_words: int | None = None,
        context_window: int | None = None,
        model: str | None = None,
        params: dict[str, Any] | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        deadline_s: float | None = None,
    ) -> Job:
        """Submit a document to summarize (style: "bullets" or "paragraph")."""
        body: dict[str, Any] = {"kind": "summarize", "document": document}
        options = {
            "instructions": instructions,
            "style": style,
            "target_words": target_words,
            "context_window": context_window,
        }
        body |= {k: v for k, v in options.items() if v is not None}
        return await self.submit(
            _with_options(body, model, params, max_attempts, idempotency_key, deadline_s)
        )

    async def get(self, job_id: str) -> Job:
        """One job."""
        job: Job = await self._request("GET", f"/api/jobs/{_id(job_id)}")
        return job

    async def retry(self, job_id: str) -> Job:
        """Run a failed or cancelled job again with a fresh attempt budget."""
        job: Job = await self._request("POST", f"/api/jobs/{_id(job_id)}/retry")
        return job

    async def attempts(self, job_id: str) -> list[dict[str, Any]]:
        """A job's attempt history."""
        data = await self._request("GET", f"/api/jobs/{_id(job_id)}/attempts")
        attempts: list[dict[str, Any]] = data["attempts"]
        return attempts

    async def list(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        include_input: bool = False,
    ) -> dict[str, Any]:
        """One page: `{"jobs": [...], "next_cursor": str | None}`; each job's `input` is None
        unless `include_input` (`get` always has it)."""
        params = {"limit": str(limit)}
        for key, value in (("status", status), ("kind", kind), ("cursor", cursor)):
            if value is not None:
                params[key] = value
        if include_input:
            params["include_input"] = "true"
        page: dict[str, Any] = await self._request("GET", "/api/jobs", params=params)
        return page

    async def iter_jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        page_size: int = 100,
        include_input: bool = False,
    ) -> AsyncIterator[Job]:
        """Every matching job, newest first, following cursors (inputs as in `list`)."""
        cursor: str | None = None
        while True:
            page = await self.list(
                status=status,
                kind=kind,
                limit=page_size,
                cursor=cursor,
                include_input=include_input,
            )
            for job in page["jobs"]:
                yield job
            cursor = page["next_cursor"]
            if cursor is None:
                return

    async def wait(
        self,
        job_id: str,
        *,
        timeout_s: float = 300.0,
        poll_s: float = 0.2,
        progress: ProgressCallback | None = None,
    ) -> Job:
        """Poll until the job is succeeded, failed or cancelled; TimeoutError after timeout_s.

        `progress(job)` (a function or a coroutine function) is called with the job first, and
        again whenever its status, attempts or progress change, the final state included.
        """
        deadline = time.monotonic() + timeout_s
        seen: tuple[Any, ...] | None = None
        while True:
            job = await self.get(job_id)
            if progress is not None and seen != (seen := _change_key(job)):
                called = progress(job)
                if inspect.isawaitable(called):
                    await called
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s:g} s")
            await asyncio.sleep(poll_s)

    # -- batches (see the README's "Batches" section) ------------------------------------

    async def submit_batch(
        self,
        jobs: Iterable[dict[str, Any]] | AsyncIterable[dict[str, Any]],
        *,
        name: str | None = None,
        models: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Submit job requests (each may carry a `custom_id`) as one batch, streamed as JSONL
        so that a large iterable is never held in memory. An invalid item raises InvalidBatch
        (its `lines` say which) and creates nothing."""
        params = [("name", name)] if name else []
        params += [("model", str(model)) for model in models or ()]
        batch: dict[str, Any] = await self._request(
            "POST",
            "/api/batches",
            params=params,
            data=_jsonl(jobs),
            headers={"Content-Type": "application/x-ndjson"},
        )
        return batch

    async def get_batch(self, batch_id: str) -> dict[str, Any]:
        """One batch: status, counts per status, progress and token usage."""
        batch: dict[str, Any] = await self._request("GET", f"/api/batches/{_id(batch_id)}")
        return batch

    async def list_batches(self, *, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        """One page: `{"batches": [...], "next_cursor": str | None}`, newest first."""
        params = {"limit": str(limit)} | ({"cursor": cursor} if cursor else {})
        page: dict[str, Any] = await self._request("GET", "/api/batches", params=params)
        return page

    async def wait_batch(
        self, batch_id: str, *, timeout_s: float = 3600.0, poll_s: float = 1.0
    ) -> dict[str, Any]:
        """Poll until every job of the batch has finished; TimeoutError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            batch = await self.get_batch(batch_id)
            if batch["status"] not in ("validating", "in_progress", "finalizing", "cancelling"):
                return batch
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"batch {batch_id} still {batch['status']} after {timeout_s:g} s"
                )
            await asyncio.sleep(poll_s)

    async def batch_results(self, batch_id: str) -> AsyncIterator[dict[str, Any]]:
        """Each job's outcome, in submission order, streamed (one dict per job)."""
        path = f"/api/batches/{_id(batch_id)}/results"
        limits = aiohttp.ClientTimeout(total=None, sock_read=self._timeout.total)
        async with self._streaming(path, limits) as content:
            async for line in content:
                if line.strip():
                    yield orjson.loads(line)

    async def compare(
        self, batch_id: str, *, limit: int = 50, cursor: int | None = None
    ) -> dict[str, Any]:
        """A page of a comparison batch: each item with every model's answer side by side."""
        params = {"limit": str(limit)} | ({"cursor": str(cursor)} if cursor is not None else {})
        page: dict[str, Any] = await self._request(
            "GET", f"/api/batches/{_id(batch_id)}/compare", params=params
        )
        return page

    async def cancel_job(self, job_id: str) -> Job:
        """Cancel a job (a running one is aborted); NotCancellable if it had finished."""
        job: Job = await self._request("POST", f"/api/jobs/{_id(job_id)}/cancel")
        return job

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        """Cancel a batch's unfinished jobs; finished ones keep their results."""
        batch: dict[str, Any] = await self._request("POST", f"/api/batches/{_id(batch_id)}/cancel")
        return batch

    async def stream(
        self, job_id: str, *, timeout_s: float | None = None
    ) -> AsyncIterator[ServerEvent]:
        """The server-sent events of a job (`status`, `progress`, `token`), as they come; it
        ends after the terminal `status` event, whose data carries the `result`. Raises
        Unauthorized if the key is revoked meanwhile, and ServiceUnavailable if the stream
        ends before the job (the API stopped: stream it again, or `wait`)."""
        path = f"/api/jobs/{_id(job_id)}/stream"
        limits = aiohttp.ClientTimeout(
            total=timeout_s, sock_connect=self._timeout.total, sock_read=STREAM_SILENCE_S
        )
        async with self._streaming(path, limits) as content:
            async for event in parse_events(content):
                if event.event == "revoked":
                    raise Unauthorized("the API key was revoked while the stream was open")
                yield event
                if event.event == "status" and event.data.get("status") in TERMINAL:
                    return
        raise ServiceUnavailable(
            f"the stream of job {job_id} ended before the job did (did the API at "
            f"{self.base_url} restart?); stream it again, or wait() for it"
        )

    @asynccontextmanager
    async def _streaming(
        self, path: str, limits: aiohttp.ClientTimeout
    ) -> AsyncIterator[aiohttp.StreamReader]:
        """The body of a GET that is read as it comes (an error answer raises, as _request)."""
        with self._reaching(path):
            async with self._open().get(
                self.base_url + path, headers=self._headers, timeout=limits
            ) as response:
                if response.status >= 400:
                    raise _error(response.status, await _json(response), path)
                yield response.content

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> Any:
        session = self._open()
        with self._reaching(path):
            async with session.request(
                method,
                self.base_url + path,
                headers=self._headers | (headers or {}),
                timeout=self._timeout,
                **kwargs,
            ) as response:
                data = await _json(response)
                if response.status >= 400:
                    raise _error(response.status, data, path)
                return data

    @contextmanager
    def _reaching(self, path: str) -> Iterator[None]:
        """Raise ServiceUnavailable, naming the API and what went wrong, for a connection that
        fails or a server that does not answer in time."""
        try:
            yield
        except TimeoutError:
            raise ServiceUnavailable(
                f"the promptq API at {self.base_url} did not answer {path} in time; is it "
                "overloaded, or the timeout too short?"
            ) from None
        except aiohttp.ClientError as exc:
            raise ServiceUnavailable(
                f"cannot reach the promptq API at {self.base_url} "
                f"({exc.__class__.__name__}: {str(exc)[:200]}); is it running?"
            ) from None


def _id(value: str) -> str:
    """A job or batch id as one path segment: quoted whole, so that no id reaches another
    route (`../batches/...`, `x#`)."""
    if not value:
        raise InvalidRequest("the id is empty")
    return quote(str(value), safe="")


async def _json(response: aiohttp.ClientResponse) -> Any:
    try:
        return await response.json(content_type=None)
    except ValueError:
        return None


def _error(status: int, data: Any, path: str) -> PromptQError:
    """The exception for an API error answer (`{"error": {"code", "message"}}`)."""
    error = data.get("error") if isinstance(data, dict) else None
    error = error if isinstance(error, dict) else {}
    message = error.get("message") or f"HTTP {status} from {path}"
    kind = _BY_CODE.get(str(error.get("code"))) or _BY_STATUS.get(status)
    if kind is InvalidBatch:
        lines = error.get("lines")
        return InvalidBatch(message, lines=lines if isinstance(lines, list) else [])
    return (kind or PromptQError)(message)


def _change_key(job: Job) -> tuple[Any, ...]:
    """What `wait(progress=...)` reports a change of."""
    return (job.get("status"), job.get("attempts"), repr(job.get("progress")))


async def _jsonl(
    jobs: Iterable[dict[str, Any]] | AsyncIterable[dict[str, Any]],
) -> AsyncIterator[bytes]:
    """The jobs as JSONL, about 256 KB per chunk."""
    buffer = bytearray()
    if isinstance(jobs, AsyncIterable):
        async for job in jobs:
            buffer += orjson.dumps(job) + b"\n"
            if len(buffer) >= 256 * 1024:
                yield bytes(buffer)
                buffer.clear()
    else:
        for job in jobs:
            buffer += orjson.dumps(job) + b"\n"
            if len(buffer) >= 256 * 1024:
                yield bytes(buffer)
                buffer.clear()
    if buffer:
        yield bytes(buffer)


def _with_options(
    body: dict[str, Any],
    model: str | None,
    params: dict[str, Any] | None,
    max_attempts: int | None,
    idempotency_key: str | None,
    deadline_s: float | None,
) -> dict[str, Any]:
    options = {
        "model": model,
        "params": params,
        "max_attempts": max_attempts,
        "idempotency_key": idempotency_key,
        "deadline_s": deadline_s,
    }
    return body | {k: v for k, v in options.items() if v is not None}
