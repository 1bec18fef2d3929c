"""The backends' models (`GET {base_url}/models` of each endpoint), fetched on demand and
reused briefly.

`/v1/models` lists them all, and a chat request naming a model its endpoint does not list is
refused at submit (422, listing the models) instead of failing later in the worker. When an
endpoint cannot be asked, the check lets the request through: the job is kept and the worker
reports what the backend says.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from pydantic import SecretStr

from promptq.errors import InvalidRequest, PromptQError

logger = logging.getLogger(__name__)

#: How long listing an endpoint's models may take.
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


@dataclass(frozen=True, slots=True)
class ModelSource:
    """An endpoint to list models from, and the model names (globs) routed to it (see
    promptq.endpoints: the same table the workers route calls by)."""

    name: str
    base_url: str
    api_key: SecretStr | None
    patterns: tuple[str, ...] = ("*",)

    def serves(self, model: str) -> bool:
        """True if calls to `model` go to this endpoint."""
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.patterns)


class ModelCatalog:
    """Each endpoint's model list, cached for `PROMPTQ_MODELS_CACHE_S` seconds."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        sources: Sequence[ModelSource],
        *,
        ttl_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not sources:
            raise ValueError("a model catalog needs at least one endpoint")
        self._session = session
        self._sources = list(sources)
        self._ttl_s = ttl_s
        self._monotonic = monotonic
        self._cached: dict[str, tuple[list[dict[str, Any]], float]] = {}
        self._locks = {source.name: asyncio.Lock() for source in self._sources}

    def source(self, model: str) -> ModelSource:
        """The endpoint `model` is routed to: the first that serves it, else the last."""
        return next((s for s in self._sources if s.serves(model)), self._sources[-1])

    async def models(self) -> list[dict[str, Any]]:
        """Every endpoint's model objects (`{"id", "object", ...}`), each id once.
        ModelsUnavailable when no endpoint could be asked."""
        seen: dict[str, dict[str, Any]] = {}
        failures: list[ModelsUnavailable] = []
        for source in self._sources:
            try:
                listed = await self._models_of(source)
            except ModelsUnavailable as exc:
                failures.append(exc)
                continue
            for model in listed:
                if source.serves(model["id"]) or source is self._sources[-1]:
                    seen.setdefault(model["id"], model)
        if failures and len(failures) == len(self._sources):
            raise failures[0]
        return list(seen.values())

    async def check(self, names: Iterable[str]) -> None:
        """Raise UnknownModel unless each model's endpoint lists it."""
        for name in names:
            known = await self._listed_by_endpoint_of(name)
            if known is not None and name not in known:
                listed = ", ".join(sorted(known)[:MAX_LISTED]) or "(none)"
                raise UnknownModel(
                    f"the model {name!r} is not served by the model endpoint; "
                    f"available models: {listed}"
                )

    async def unknown(self, names: Iterable[str]) -> set[str]:
        """The models among `names` that their endpoint does not list."""
        missing = set()
        for name in set(names):
            known = await self._listed_by_endpoint_of(name)
            if known is not None and name not in known:
                missing.add(name)
        return missing

    async def _listed_by_endpoint_of(self, name: str) -> set[str] | None:
        """The models `name`'s endpoint lists; None (trust it) when it cannot be asked."""
        try:
            return {str(m.get("id")) for m in await self._models_of(self.source(name))}
        except ModelsUnavailable as exc:
            logger.warning("model check of %s skipped: %s", name, exc.message)
            return None

    async def _models_of(self, source: ModelSource) -> list[dict[str, Any]]:
        async with self._locks[source.name]:  # one fetch at a time; the others reuse it
            cached = self._cached.get(source.name)
            if cached is not None and cached[1] > self._monotonic():
                return cached[0]
            data = await self._fetch(source)
            self._cached[source.name] = (data, self._monotonic() + self._ttl_s)
            return data

    async def _fetch(self, source: ModelSource) -> list[dict[str, Any]]:
        headers = {}
        if source.api_key is not None and source.api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {source.api_key.get_secret_value()}"
        timeout = aiohttp.ClientTimeout(total=LIST_TIMEOUT_S)
        try:
            async with self._session.get(
                source.base_url.rstrip("/") + "/models", headers=headers, timeout=timeout
            ) as response:
                raw = await response.read()
                if response.status >= 400:
                    raise ModelsUnavailable(
                        f"endpoint {source.name} answered HTTP {response.status} to GET /models"
                    )
            data = orjson.loads(raw)["data"]
            if not isinstance(data, list):
                raise TypeError("data is not a list")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ModelsUnavailable(
                f"endpoint {source.name} did not list its models ({exc.__class__.__name__})"
            ) from exc
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelsUnavailable(f"endpoint {source.name}'s model list is malformed") from exc
        return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
