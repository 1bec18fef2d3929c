"""The client for OpenAI-compatible `/chat/completions` endpoints, with error classification."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from promptq.errors import PermanentLLMError, TransientLLMError
from promptq.logs import Redactor
from promptq.store import storable_text
from worker.retry import is_transient_status, parse_retry_after_s

logger = logging.getLogger(__name__)

#: `jobs.finish_reason` is a VARCHAR(32); longer (non-standard) values are cut.
MAX_FINISH_REASON_CHARS = 32
#: Largest token count kept: the jobs table's token columns are 32-bit INTEGERs.
MAX_TOKEN_COUNT = 2**31 - 1
#: Longest slice of an error body kept in an error message.
MAX_ERROR_BODY_CHARS = 500


@dataclass(frozen=True, slots=True)
class Completion:
    """The parts of a chat completion promptq keeps."""

    content: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    model: str | None


class LLMClient:
    """Calls one OpenAI-compatible endpoint over a shared aiohttp session.

    The API key is sent as a Bearer token and never appears in errors or logs.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str | None,
        timeout_s: float,
    ) -> None:
        self._session = session
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._redact = Redactor([api_key] if api_key else [])
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        *,
        timeout_s: float | None = None,
    ) -> Completion:
        """One chat completion. Raises TransientLLMError or PermanentLLMError.

        `timeout_s` shortens the client's timeout for this call (a job's deadline is near).
        """
        body = orjson.dumps({**params, "model": model, "messages": messages, "stream": False})
        async with self._post(
            body,
            timeout_s,
            timed_out="did not answer",
            broke="connection to the model endpoint failed",
        ) as response:
            raw = await response.read()
            if response.status >= 400:
                raise self._http_error(response.status, raw, response.headers)
        return self._parse(raw, response.status)

    async def chat_stream(
        self,
        model: str,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        on_delta: Callable[[str], Awaitable[None]],
        *,
        timeout_s: float | None = None,
    ) -> Completion:
        """One chat completion streamed as server-sent events; `on_delta` gets each piece of
        text as it arrives. Raises like `chat`; a stream cut before `[DONE]` is transient.
        `timeout_s` shortens the client's timeout, as for `chat`."""
        body = orjson.dumps(
            {
                **params,
                "model": model,
                "messages": messages,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        stream = _StreamState()
        async with self._post(
            body,
            timeout_s,
            timed_out="did not finish",
            broke="the stream from the model endpoint broke",
        ) as response:
            if response.status >= 400:
                raw = await response.read()
                raise self._http_error(response.status, raw, response.headers)
            async for line in response.content:
                delta = self._stream_event(line, stream, response.status)
                if delta:
                    await on_delta(delta)
                if stream.done:
                    break
        if not stream.done:
            raise TransientLLMError("the model endpoint closed the stream before [DONE]")
        if not stream.parts and stream.finish_reason is None:
            raise TransientLLMError("the model streamed no text content")
        return Completion(
            content=storable_text("".join(stream.parts)),
            finish_reason=_as_str(stream.finish_reason, MAX_FINISH_REASON_CHARS),
            prompt_tokens=_as_int(stream.usage.get("prompt_tokens")),
            completion_tokens=_as_int(stream.usage.get("completion_tokens")),
            model=stream.model,
        )

    @asynccontextmanager
    async def _post(
        self, body: bytes, timeout_s: float | None, *, timed_out: str, broke: str
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST `body` to the endpoint; a timeout or a connection error, while posting or while
        the caller reads the response, becomes a TransientLLMError: "the model endpoint
        {timed_out} within N s", or "{broke}: <error>" (scrubbed)."""
        timeout = self._call_timeout(timeout_s)
        try:
            async with self._session.post(
                self._url, data=body, headers=self._headers, timeout=timeout
            ) as response:
                yield response
        except TimeoutError as exc:
            raise TransientLLMError(
                f"the model endpoint {timed_out} within {timeout.total:g} s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise TransientLLMError(self._scrub(f"{broke}: {exc!r}")) from exc

    def _call_timeout(self, timeout_s: float | None) -> aiohttp.ClientTimeout:
        """The client's timeout, shortened to `timeout_s` if that is sooner."""
        timeout = self._timeout
        if timeout_s is not None and timeout.total is not None and timeout_s < timeout.total:
            timeout = aiohttp.ClientTimeout(total=max(timeout_s, 0.001))
        return timeout

    def _stream_event(self, line: bytes, stream: _StreamState, status: int) -> str:
        """Fold one SSE line into `stream`; return the text it adds."""
        line = line.strip()
        if not line.startswith(b"data:"):
            return ""  # blank separators, comments, `event:` lines
        data = line[len(b"data:") :].strip()
        if data == b"[DONE]":
            stream.done = True
            return ""
        try:
            event = orjson.loads(data)
            if not isinstance(event, dict):
                raise TypeError("not an object")
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise TransientLLMError(
                f"the model endpoint streamed a malformed event: {_snippet(data, self._scrub)}",
                status_code=status,
            ) from exc
        if "error" in event:  # Ollama and others report mid-stream errors in-band
            raise TransientLLMError(
                f"the model endpoint failed mid-stream: {_error_detail(data, self._scrub)}",
                status_code=status,
            )
        if isinstance(event.get("usage"), dict):
            stream.usage = event["usage"]
        stream.model = _as_str(event.get("model")) or stream.model
        text = ""
        for choice in event.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                text += delta["content"]
            if choice.get("finish_reason") is not None:
                stream.finish_reason = choice["finish_reason"]
        if text:
            stream.parts.append(text)
        return text

    def _http_error(
        self, status: int, raw: bytes, headers: Any
    ) -> TransientLLMError | PermanentLLMError:
        detail = _error_detail(raw, self._scrub)
        message = self._scrub(f"HTTP {status} from the model endpoint: {detail}")
        if is_transient_status(status):
            return TransientLLMError(
                message, status_code=status, retry_after_s=parse_retry_after_s(headers)
            )
        return PermanentLLMError(message, status_code=status)

    def _parse(self, raw: bytes, status: int) -> Completion:
        if not raw.strip():
            raise TransientLLMError("the model endpoint returned an empty body", status_code=status)
        try:
            data = orjson.loads(raw)
            choice = data["choices"][0]
            content = choice["message"]["content"]
            usage = data.get("usage") or {}
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise TransientLLMError(
                f"the model endpoint returned a malformed body: {_snippet(raw, self._scrub)}",
                status_code=status,
            ) from exc
        if not isinstance(content, str):
            raise TransientLLMError("the model returned no text content", status_code=status)
        if not isinstance(usage, dict):
            usage = {}  # optional metadata: a strange `usage` must not discard a good answer
        return Completion(
            content=storable_text(content),
            finish_reason=_as_str(choice.get("finish_reason"), MAX_FINISH_REASON_CHARS),
            prompt_tokens=_as_int(usage.get("prompt_tokens")),
            completion_tokens=_as_int(usage.get("completion_tokens")),
            model=_as_str(data.get("model")),
        )

    def _scrub(self, message: str) -> str:
        """The text without the provider key, or anything else shaped like a key it echoes,
        and storable (promptq.store.storable_text: it may quote the endpoint's body)."""
        return storable_text(self._redact(message))


@dataclass(slots=True)
class _StreamState:
    """What a streamed completion has delivered so far."""

    parts: list[str] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    finish_reason: Any = None
    model: str | None = None
    done: bool = False


def _error_detail(raw: bytes, scrub: Callable[[str], str]) -> str:
    """The error message of an error body, scrubbed of secrets before it is cut short."""
    try:
        data = orjson.loads(raw)
        message = data["error"]["message"] if isinstance(data.get("error"), dict) else data["error"]
        return scrub(str(message))[:MAX_ERROR_BODY_CHARS]
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return _snippet(raw, scrub)


def _snippet(raw: bytes, scrub: Callable[[str], str]) -> str:
    """The start of a body, scrubbed first: cutting first could leave half a key unmatched."""
    text = scrub(raw.decode("utf-8", errors="replace")).strip()
    return repr(text[:MAX_ERROR_BODY_CHARS]) if text else "(empty body)"


def _as_int(value: Any) -> int | None:
    """A token count, or None for anything that is not one (or does not fit an SQL INTEGER)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_COUNT:
        return value
    return None


def _as_str(value: Any, max_chars: int | None = None) -> str | None:
    return storable_text(value[:max_chars]) if isinstance(value, str) else None
