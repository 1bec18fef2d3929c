"""Endpoints and routing: which model endpoint (and which limits) serves each model.

A TOML file (PROMPTQ_ENDPOINTS_FILE) or a JSON env var (PROMPTQ_ENDPOINTS) lists endpoints:

    [[endpoints]]
    name = "openai"
    models = ["gpt-*", "o3*"]          # glob patterns (fnmatch), matched against the job's model
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"     # the NAME of the env var holding the key, never the key
    timeout_s = 120
    [endpoints.limits]
    max_in_flight = 50
    rpm = 500
    tpm = 200000

A model goes to the first endpoint, in file order, with a pattern that matches it. A model no
endpoint matches goes to the default endpoint, built from PROMPTQ_LLM_BASE_URL,
PROMPTQ_LLM_API_KEY and PROMPTQ_LLM_TIMEOUT_S (without limits), which is also the only
endpoint when there is no config at all: that keeps promptq's behaviour without a config.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from promptq.errors import ConfigError
from promptq.limits import ScopeLimits
from promptq.settings import Settings

logger = logging.getLogger(__name__)

#: The name of the endpoint built from PROMPTQ_LLM_* (and of the catch-all route).
DEFAULT_ENDPOINT = "default"
#: Longest per-call timeout an endpoint may set (a day; more is a mistake, and an infinite one
#: cannot be scheduled at all).
MAX_TIMEOUT_S = 86_400.0
#: Most of its configured rate a rpm/tpm limit may lose to whole requests/tokens per window
#: (see LimitsConfig.per_window); a window that would lose more is refused.
MAX_RATE_LOSS = 0.01


class LimitsConfig(BaseModel):
    """Global limits of one endpoint, shared by every worker through Redis."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    #: Requests in flight at once (with `adaptive`, the upper bound of the adaptive limit).
    max_in_flight: int | None = Field(default=None, ge=1, le=100_000)
    #: Requests per minute.
    rpm: int | None = Field(default=None, ge=1)
    #: Tokens (prompt + completion) per minute. Each call reserves an estimate (its prompt,
    #: plus max_tokens or `assumed_max_tokens`), corrected by the usage it reports.
    tpm: int | None = Field(default=None, ge=1)
    #: `endpoint`: one set of counters for all the endpoint's models; `model`: one per model.
    per: Literal["endpoint", "model"] = "endpoint"
    #: The window rpm and tpm are counted over; a shorter one spreads requests more evenly
    #: (with 10 s, at most rpm/6 requests in any 10 s; see per_window for the rounding).
    window_s: float = Field(default=60.0, ge=1.0, le=3600.0)
    #: Completion tokens reserved for a call that sets no max_tokens.
    assumed_max_tokens: int = Field(default=512, ge=0)
    #: Find the in-flight limit automatically (AIMD) between min_in_flight and max_in_flight.
    adaptive: bool = False
    min_in_flight: int = Field(default=1, ge=1)
    #: Where the adaptive limit starts; min_in_flight if unset.
    initial_in_flight: int | None = Field(default=None, ge=1)
    #: The adaptive limit is multiplied by this after a window with repeated overload.
    decrease_factor: float = Field(default=0.9, ge=0.5, lt=1.0)
    #: A window whose mean latency exceeds the best seen by this factor counts as overload.
    latency_ratio: float = Field(default=2.0, gt=1.0, le=100.0)

    @model_validator(mode="after")
    def _check_adaptive(self) -> LimitsConfig:
        if self.adaptive and self.max_in_flight is None:
            raise ValueError("adaptive = true needs max_in_flight (the upper bound)")
        if self.max_in_flight is not None and self.min_in_flight > self.max_in_flight:
            raise ValueError("min_in_flight must not exceed max_in_flight")
        initial = self.initial_in_flight
        if initial is not None and not self.min_in_flight <= initial <= (self.max_in_flight or 0):
            raise ValueError("initial_in_flight must lie between min_in_flight and max_in_flight")
        for field, rate, unit in (("rpm", self.rpm, "requests"), ("tpm", self.tpm, "tokens")):
            if rate is not None:
                _check_rate(field, rate, unit, self.window_s)
        return self

    @property
    def any(self) -> bool:
        """True if any limit is set."""
        return any(v is not None for v in (self.max_in_flight, self.rpm, self.tpm))

    def per_window(self, per_minute: int | None) -> int | None:
        """A per-minute limit scaled to `window_s`, rounded down to whole requests (tokens),
        so that the configured rate is never exceeded. The validator makes sure this is at
        least 1 and loses at most MAX_RATE_LOSS of the rate."""
        if per_minute is None:
            return None
        return max(1, _whole(per_minute * self.window_s / 60.0))

    def effective_per_minute(self, per_minute: int | None) -> float | None:
        """The rate `per_window` really allows, per minute (at most `per_minute`)."""
        window = self.per_window(per_minute)
        return None if window is None else window * 60.0 / self.window_s

    def scope_limits(self) -> ScopeLimits:
        """These limits as the Redis scripts take them."""
        return ScopeLimits(
            max_in_flight=self.max_in_flight,
            rpm_per_window=self.per_window(self.rpm),
            tpm_per_window=self.per_window(self.tpm),
            window_s=self.window_s,
            adaptive=self.adaptive,
            min_in_flight=self.min_in_flight,
            initial_in_flight=self.initial_in_flight or self.min_in_flight,
            decrease_factor=self.decrease_factor,
            latency_ratio=self.latency_ratio,
        )


def _whole(value: float) -> int:
    """`value` rounded down, forgiving float noise (600 * 0.1 is not quite 60)."""
    return math.floor(value + 1e-9)


def _check_rate(field: str, rate: int, unit: str, window_s: float) -> None:
    """Refuse a rate that window_s turns into less than one per window, or into a whole
    number per window that loses more than MAX_RATE_LOSS of it."""
    exact = rate * window_s / 60.0
    if exact < 1.0 - 1e-9:
        raise ValueError(
            f"{field} = {rate} with window_s = {window_s:g} allows {exact:.3g} {unit} per window, "
            f"less than one: raise window_s to at least {_window_for(1, rate):g} "
            f"(60 / {field}) or {field} to at least {math.ceil(60.0 / window_s - 1e-9)} "
            "(60 / window_s)"
        )
    whole = _whole(exact)
    if whole < exact * (1.0 - MAX_RATE_LOSS):
        effective = whole * 60.0 / window_s
        windows = {_window_for(n, rate) for n in (whole, whole + 1)}
        choices = sorted(w for w in windows if 1.0 <= w <= 3600.0)
        raise ValueError(
            f"{field} = {rate} with window_s = {window_s:g} allows {exact:.4g} {unit} per window; "
            f"counted whole that is {whole} per {window_s:g} s, {effective:.4g} per minute "
            f"instead of {rate}: use window_s = {' or '.join(f'{w:g}' for w in [*choices, 60])}, "
            f"so that {field} * window_s / 60 is whole"
        )


def _window_for(per_window: int, rate: int) -> float:
    """The window (s, rounded up to 0.1 ms) in which `rate` per minute is `per_window`."""
    return math.ceil(per_window * 60.0 / rate * 10_000 - 1e-6) / 10_000


class EndpointConfig(BaseModel):
    """One entry of the endpoints file, as written."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    models: list[str] = Field(min_length=1)
    #: An http:// or https:// URL with a host.
    base_url: str
    #: The name of the environment variable that holds the API key (no key if unset).
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    timeout_s: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_S)
    limits: LimitsConfig = LimitsConfig()

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        # The message never repeats the URL: it may carry credentials.
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 (raises ValueError for a bad port)
        except ValueError:
            parts = SplitResult("", "", "", "", "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "base_url must be an http:// or https:// URL with a host, "
                "like http://localhost:11434/v1"
            )
        return value


class EndpointsFile(BaseModel):
    """The whole endpoints file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoints: list[EndpointConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> EndpointsFile:
        names = [e.name for e in self.endpoints]
        dupes = sorted({n for n in names if names.count(n) > 1} | ({DEFAULT_ENDPOINT} & set(names)))
        if dupes:
            raise ValueError(
                f"endpoint names must be unique and not {DEFAULT_ENDPOINT!r}: {', '.join(dupes)}"
            )
        return self


@dataclass(frozen=True)
class Endpoint:
    """A resolved endpoint: where to send a model's calls, with which key and limits."""

    name: str
    patterns: tuple[str, ...]
    base_url: str
    api_key_env: str | None
    api_key: SecretStr | None
    timeout_s: float
    limits: LimitsConfig

    def matches(self, model: str) -> bool:
        """True if one of the endpoint's patterns matches `model` (case-sensitive glob)."""
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.patterns)

    def scope(self, model: str) -> str:
        """The name of the counters a call to `model` counts against."""
        return f"{self.name}/{model}" if self.limits.per == "model" else self.name

    @property
    def key_is_set(self) -> bool:
        """True if the endpoint has an API key (without revealing it)."""
        return self.api_key is not None and bool(self.api_key.get_secret_value())


@dataclass(frozen=True)
class EndpointTable:
    """Every endpoint, in match order, with the default last."""

    endpoints: tuple[Endpoint, ...]
    #: Where the table came from (a file path, PROMPTQ_ENDPOINTS or the defaults).
    source: str

    def resolve(self, model: str) -> Endpoint:
        """The endpoint for `model`: the first that matches, else the default."""
        for endpoint in self.endpoints:
            if endpoint.matches(model):
                return endpoint
        return self.endpoints[-1]

    def by_name(self, name: str) -> Endpoint | None:
        """The endpoint called `name`, if any."""
        return next((e for e in self.endpoints if e.name == name), None)

    @cached_property
    def has_limits(self) -> bool:
        """True if any endpoint has a limit (without one, the limiter is skipped entirely)."""
        return any(e.limits.any for e in self.endpoints)


def load_endpoints(settings: Settings, environ: Mapping[str, str] | None = None) -> EndpointTable:
    """The endpoint table from settings; API keys are read from `environ` (os.environ).

    Raises ConfigError, naming the file (or env var) and the field, for a bad config.
    """
    environ = os.environ if environ is None else environ
    default = Endpoint(
        name=DEFAULT_ENDPOINT,
        patterns=("*",),
        base_url=settings.llm_base_url,
        api_key_env=None,
        api_key=settings.llm_api_key,
        timeout_s=settings.llm_timeout_s,
        limits=LimitsConfig(),
    )
    parsed, source = _read_config(settings)
    endpoints = [
        Endpoint(
            name=e.name,
            patterns=tuple(e.models),
            base_url=e.base_url.rstrip("/"),
            api_key_env=e.api_key_env,
            api_key=SecretStr(environ[e.api_key_env])
            if e.api_key_env and environ.get(e.api_key_env)
            else None,
            timeout_s=e.timeout_s or settings.llm_timeout_s,
            limits=e.limits,
        )
        for e in parsed.endpoints
    ]
    for endpoint in endpoints:
        if endpoint.api_key_env and not endpoint.key_is_set:
            logger.warning(
                "endpoint %s: env var %s is not set; calls go without an API key",
                endpoint.name,
                endpoint.api_key_env,
            )
    return EndpointTable((*endpoints, default), source)


def redact_url(url: str) -> str:
    """`url` with any password in it replaced by `***` (safe to print)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parts.username or ''}:***@{host}"
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "(unparseable URL)"


def _endpoints_file(settings: Settings) -> Path | None:
    """PROMPTQ_ENDPOINTS_FILE, or None if unset or empty (as an empty PROMPTQ_ENDPOINTS)."""
    path = settings.endpoints_file
    if path is None or str(path) in ("", "."):
        return None
    return path


def _read_config(settings: Settings) -> tuple[EndpointsFile, str]:
    endpoints_file = _endpoints_file(settings)
    if endpoints_file is not None and settings.endpoints:
        raise ConfigError("set either PROMPTQ_ENDPOINTS_FILE or PROMPTQ_ENDPOINTS, not both")
    if endpoints_file is not None:
        path = endpoints_file
        source = str(path)
        try:
            data: Any = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(
                f"cannot read the endpoints file {source} (PROMPTQ_ENDPOINTS_FILE): "
                f"{exc.strerror or exc}"
            ) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"the endpoints file {source} is not valid TOML: {exc}") from None
    elif settings.endpoints:
        source = "PROMPTQ_ENDPOINTS"
        try:
            data = json.loads(settings.endpoints)
        except ValueError as exc:
            raise ConfigError(f"PROMPTQ_ENDPOINTS is not valid JSON: {exc}") from None
        if isinstance(data, list):  # a bare list of endpoints is accepted too
            data = {"endpoints": data}
        elif not isinstance(data, dict) or "endpoints" not in data:
            raise ConfigError(
                "PROMPTQ_ENDPOINTS must be a JSON list of endpoints "
                '([{"name": ..., "models": [...], "base_url": ...}, ...]), '
                f"not a single {'object' if isinstance(data, dict) else type(data).__name__}"
            )
    else:
        return EndpointsFile(), "defaults (PROMPTQ_LLM_*)"
    try:
        return EndpointsFile.model_validate(data), source
    except ValidationError as exc:
        raise ConfigError(f"invalid endpoints config in {source}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    """`endpoints[1].limits.rpm: Input should be greater than or equal to 1; ...`"""
    parts = []
    for error in exc.errors():
        where = ""
        for item in error["loc"]:
            where += f"[{item}]" if isinstance(item, int) else (f".{item}" if where else item)
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)
