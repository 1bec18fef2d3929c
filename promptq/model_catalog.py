"""The backend's models (`GET {llm_base_url}/models`), fetched on demand and reused briefly.

`/v1/models` proxies the list, and a chat request naming a model that is not on it is
refused at submit (422, listing the models) instead of failing later in the worker. When the
backend cannot be asked, the check lets the request through: the job is kept and the worker
reports what the backend says.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
import orjson

from promptq.errors import InvalidRequest, PromptQError
from promptq.settings import Settings

logger = logging.getLogger(__name__)

#: How long listing the backend's models may take.
LIST_TIMEOUT_S = 5.0
#: Most model names an error message lists.
MAX_LISTED = 50


class UnknownModel(InvalidRequest):
    """The model is not served by the model endpoint."""

    code = "model_not_found"
    http_status = 422


class ModelsUnavailable(PromptQError):
    """The model endpoint did not list its models; try again shortly."""

    code = "models_unavailable"
    http_status = 503


class ModelCatalog:
    """The backend's model list, cached for `PROMPTQ_MODELS_CACHE_S` seconds."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: Settings,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._url = settings.llm_base_url + "/models"
        self._headers = {}
        if settings.llm_api_key is not None:
            self._headers["Authorization"] = f"Bearer {settings.llm_api_key.get_secret_value()}"
        self._ttl_s = settings.models_cache_s
        self._monotonic = monotonic
        self._cached: tuple[list[dict[str, Any]], float] | None = None
        self._lock = asyncio.Lock()

    async def models(self) -> list[dict[str, Any]]:
        """The backend's model objects (`{"id", "object", ...}`); ModelsUnavailable if it
        cannot be asked."""
        async with self._lock:  # one fetch at a time; the others reuse its answer
            now = self._monotonic()
            if self._cached is not None and self._cached[1] > now:
                return self._cached[0]
            data = await self._fetch()
            self._cached = (data, self._monotonic() + self._ttl_s)
            return data

    async def check(self, names: Iterable[str]) -> None:
        """Raise UnknownModel unless the backend serves every model in `names`."""
        try:
            known = {str(m.get("id")) for m in await self.models()}
        except ModelsUnavailable as exc:
            logger.warning("model check skipped: %s", exc.message)
            return
        missing = [name for name in names if name not in known]
        if missing:
            listed = ", ".join(sorted(known)[:MAX_LISTED]) or "(none)"
            raise UnknownModel(
                f"the model {missing[0]!r} is not served by the model endpoint; "
                f"available models: {listed}"
            )

    async def _fetch(self) -> list[dict[str, Any]]:
        timeout = aiohttp.ClientTimeout(total=LIST_TIMEOUT_S)
        try:
            async with self._session.get(
                self._url, headers=self._headers, timeout=timeout
            ) as response:
                raw = await response.read()
                if response.status >= 400:
                    raise ModelsUnavailable(
                        f"the model endpoint answered HTTP {response.status} to GET /models"
                    )
            data = orjson.loads(raw)["data"]
            if not isinstance(data, list):
                raise TypeError("data is not a list")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ModelsUnavailable(
                f"the model endpoint did not list its models ({exc.__class__.__name__})"
            ) from exc
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelsUnavailable("the model endpoint's model list is malformed") from exc
        return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
