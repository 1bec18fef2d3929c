"""Route each LLM call by model to its endpoint's client, inside that endpoint's limits.

`ModelRouter` has the same `chat` / `chat_stream` interface as `worker.llm.LLMClient` (one
client per endpoint) and is what jobs get as `ctx["llm"]`. For an endpoint with limits, each
call holds a permit (worker.limiter) from just before the request until its answer; the
answer's usage corrects the tokens reserved, and its status feeds the adaptive limit
(429 and 503 count as overload).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from promptq.endpoints import Endpoint, EndpointTable
from promptq.errors import LLMError
from worker.limiter import Limiter, estimate_tokens
from worker.llm import Completion, LLMClient

#: Statuses that tell an adaptive limit the endpoint is overloaded.
OVERLOAD_STATUSES = frozenset({429, 503})


def client_options(endpoint: Endpoint) -> dict[str, Any]:
    """The LLMClient keyword arguments for an endpoint (its key read from its env var)."""
    return {
        "base_url": endpoint.base_url,
        "api_key": endpoint.api_key.get_secret_value() if endpoint.api_key else None,
        "timeout_s": endpoint.timeout_s,
    }


class ModelRouter:
    """One LLMClient per endpoint (made by `make_client`, plain ones by default); picks the
    endpoint of each call's model."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        table: EndpointTable,
        limiter: Limiter | None = None,
        *,
        chars_per_token: float = 4.0,
        make_client: Callable[[Endpoint], LLMClient] | None = None,
    ) -> None:
        self.table = table
        self.limiter = limiter
        self.chars_per_token = chars_per_token

        def plain(endpoint: Endpoint) -> LLMClient:
            return LLMClient(session, **client_options(endpoint))

        make = make_client or plain
        self._clients = {endpoint.name: make(endpoint) for endpoint in table.endpoints}

    def endpoint(self, model: str) -> Endpoint:
        """The endpoint that serves `model`."""
        return self.table.resolve(model)

    def client(self, model: str) -> LLMClient:
        """The HTTP client of `model`'s endpoint."""
        return self._clients[self.endpoint(model).name]

    async def chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        *,
        timeout_s: float | None = None,
    ) -> Completion:
        """`LLMClient.chat` on the model's endpoint, within its limits."""
        return await self._limited(
            model,
            messages,
            params,
            lambda client: client.chat(model, messages, params, timeout_s=timeout_s),
        )

    async def chat_stream(
        self,
        model: str,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        on_delta: Callable[[str], Awaitable[None]],
        *,
        timeout_s: float | None = None,
    ) -> Completion:
        """`LLMClient.chat_stream` on the model's endpoint, within its limits."""
        return await self._limited(
            model,
            messages,
            params,
            lambda client: client.chat_stream(
                model, messages, params, on_delta, timeout_s=timeout_s
            ),
        )

    async def _limited(
        self,
        model: str,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        call: Callable[[LLMClient], Awaitable[Completion]],
    ) -> Completion:
        """`call` on the client of `model`'s endpoint, holding a permit if it has limits."""
        endpoint = self.endpoint(model)
        client = self._clients[endpoint.name]
        limiter = self.limiter
        if limiter is None or not limiter.limited(endpoint):
            return await call(client)
        tokens = estimate_tokens(
            messages,
            params,
            chars_per_token=self.chars_per_token,
            assumed=endpoint.limits.assumed_max_tokens,
        )
        permit = await limiter.acquire(endpoint, model, tokens)
        started = time.monotonic()
        used: int | None = None
        latency_s: float | None = None
        overload = False
        try:
            completion = await call(client)
            latency_s = time.monotonic() - started
            if completion.prompt_tokens is not None or completion.completion_tokens is not None:
                used = (completion.prompt_tokens or 0) + (completion.completion_tokens or 0)
            return completion
        except LLMError as exc:
            overload = exc.status_code in OVERLOAD_STATUSES
            if exc.status_code is not None and 400 <= exc.status_code < 500:
                used = 0  # refused before any generation: nothing was spent
            raise
        finally:
            await limiter.release(permit, tokens_used=used, latency_s=latency_s, overload=overload)
