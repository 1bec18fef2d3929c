"""The client for OpenAI-compatible `/chat/completions` endpoints, with error classification."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from promptq.errors import PermanentLLMError, TransientLLMError
from worker.retry import is_transient_status, parse_retry_after_s

logger = logging.getLogger(__name__)

#: `jobs.finish_reason` is a VARCHAR(32); longer (non-standard) values are cut.
MAX_FINISH_REASON_CHARS = 32
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
        self._secret = api_key
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
        timeout = self._timeout
        if timeout_s is not None and timeout.total is not None and timeout_s < timeout.total:
            timeout = aiohttp.ClientTimeout(total=max(timeout_s, 0.001))
        try:
            async with self._session.post(
                self._url, data=body, headers=self._headers, timeout=timeout
            ) as response:
                raw = await response.read()
                if response.status >= 400:
                    raise self._http_error(response.status, raw, response.headers)
        except TimeoutError as exc:
            raise TransientLLMError(
                f"the model endpoint did not answer within {timeout.total:g} s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise TransientLLMError(
                self._scrub(f"connection to the model endpoint failed: {exc!r}")
            ) from exc
        return self._parse(raw, response.status)

    def _http_error(
        self, status: int, raw: bytes, headers: Any
    ) -> TransientLLMError | PermanentLLMError:
        detail = _error_detail(raw)
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
                self._scrub(f"the model endpoint returned a malformed body: {_snippet(raw)}"),
                status_code=status,
            ) from exc
        if not isinstance(content, str):
            raise TransientLLMError("the model returned no text content", status_code=status)
        if not isinstance(usage, dict):
            usage = {}  # optional metadata: a strange `usage` must not discard a good answer
        return Completion(
            content=content,
            finish_reason=_as_str(choice.get("finish_reason"), MAX_FINISH_REASON_CHARS),
            prompt_tokens=_as_int(usage.get("prompt_tokens")),
            completion_tokens=_as_int(usage.get("completion_tokens")),
            model=_as_str(data.get("model")),
        )

    def _scrub(self, message: str) -> str:
        return message.replace(self._secret, "***") if self._secret else message


def _error_detail(raw: bytes) -> str:
    try:
        data = orjson.loads(raw)
        message = data["error"]["message"] if isinstance(data.get("error"), dict) else data["error"]
        return str(message)[:MAX_ERROR_BODY_CHARS]
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return _snippet(raw)


def _snippet(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    return repr(text[:MAX_ERROR_BODY_CHARS]) if text else "(empty body)"


def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _as_str(value: Any, max_chars: int | None = None) -> str | None:
    return value[:max_chars] if isinstance(value, str) else None
