"""`promptq endpoints`: the endpoint table, its limits, and what Redis says about them now."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Any

import typer
from redis.asyncio import Redis
from redis.exceptions import RedisError
from rich.table import Table
from rich.text import Text

from promptq.cli_support import console, fail, load_settings
from promptq.endpoints import (
    DEFAULT_ENDPOINT,
    Endpoint,
    EndpointTable,
    load_endpoints,
    redact_url,
)
from promptq.errors import ConfigError
from promptq.limits import RedisLimits, ScopeState
from promptq.settings import Settings

logger = logging.getLogger(__name__)

#: How long `promptq endpoints` waits for Redis before showing the table without live numbers.
REDIS_TIMEOUT_S = 2.0


async def read_states(
    redis: Redis, settings: Settings, table: EndpointTable
) -> dict[str, list[ScopeState]]:
    """Live state of every limited endpoint's scopes (per-model scopes found by SCAN)."""
    limits = RedisLimits(redis, settings.queue_name)
    states: dict[str, list[ScopeState]] = {}
    for endpoint in table.endpoints:
        if not endpoint.limits.any:
            continue
        scopes = [endpoint.name]
        if endpoint.limits.per == "model":
            pattern = f"{settings.queue_name}:limits:{endpoint.name}/*"
            found = {
                key.decode().removeprefix(f"{settings.queue_name}:limits:").rsplit(":", 1)[0]
                async for key in redis.scan_iter(match=pattern, count=500)
            }
            scopes = sorted(found)
        states[endpoint.name] = [
            await limits.state(scope, endpoint.limits.scope_limits()) for scope in scopes
        ]
    return states


def show_endpoints(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show where each model goes, each endpoint's limits, and what Redis says now.

    From Redis: calls in flight and the adaptive limit. API keys are never shown, only whether
    their env var is set (nor a password in a base_url).
    """
    settings = load_settings()
    try:
        table = load_endpoints(settings)
    except ConfigError as exc:
        fail(exc.message)
    states, redis_error = asyncio.run(_live(settings, table))
    rows = [_row(endpoint, states.get(endpoint.name)) for endpoint in table.endpoints]
    if as_json:
        typer.echo(json.dumps({"source": table.source, "endpoints": rows}, indent=2))
        return
    view = Table(title=f"Endpoints (from {table.source}; first match wins)")
    for column in ("name", "models", "base_url", "api key", "timeout_s", "limits", "now"):
        view.add_column(column, overflow="fold")  # URLs and env var names shown whole
    for row in rows:
        view.add_row(
            row["name"],
            ", ".join(row["models"]),
            row["base_url"],
            row["api_key"],
            f"{row['timeout_s']:g}",
            row["limits_text"],
            row["now_text"],
        )
    console.print(view)
    if redis_error:
        console.print(Text.assemble(("live numbers unavailable:", "yellow"), " ", redis_error))


async def _live(
    settings: Settings, table: EndpointTable
) -> tuple[dict[str, list[ScopeState]], str | None]:
    if not table.has_limits:
        return {}, None
    redis = Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        socket_timeout=REDIS_TIMEOUT_S,
    )
    try:
        return await read_states(redis, settings, table), None
    except (RedisError, OSError) as exc:
        return {}, f"Redis is unreachable ({exc.__class__.__name__})"
    finally:
        await redis.aclose()


def _row(endpoint: Endpoint, states: list[ScopeState] | None) -> dict[str, Any]:
    limits = endpoint.limits
    if endpoint.name == DEFAULT_ENDPOINT:
        key_env = "PROMPTQ_LLM_API_KEY"
    else:
        key_env = endpoint.api_key_env or ""
    key = f"{key_env} ({'set' if endpoint.key_is_set else 'not set'})" if key_env else "none"
    parts = []
    if limits.max_in_flight is not None:
        if limits.adaptive:
            parts.append(f"in flight adaptive {limits.min_in_flight}..{limits.max_in_flight}")
        else:
            parts.append(f"in flight {limits.max_in_flight}")
    effective = {}
    for field in ("rpm", "tpm"):
        rate = getattr(limits, field)
        if rate is None:
            continue
        effective[field] = limits.effective_per_minute(rate)
        text = f"{field} {rate}"
        if limits.window_s != 60.0:
            text += f" ({limits.per_window(rate)} per {limits.window_s:g} s"
            if effective[field] != rate:  # rounded down to whole requests/tokens per window
                text += f", {effective[field]:.6g}/min"
            text += ")"
        parts.append(text)
    if parts and limits.per == "model":
        parts.append("per model")
    now = []
    for state in states or []:
        text = f"{state.in_flight} in flight"
        if state.adaptive_limit is not None:
            text += f", limit {state.adaptive_limit:.1f}"
        if state.waiting:
            text += f", {state.waiting} jobs waiting"
        now.append(f"{state.scope}: {text}" if limits.per == "model" else text)
    return {
        "name": endpoint.name,
        "models": list(endpoint.patterns),
        "base_url": redact_url(endpoint.base_url),
        "api_key_env": key_env or None,
        "api_key_set": endpoint.key_is_set,
        "api_key": key,
        "timeout_s": endpoint.timeout_s,
        "limits": limits.model_dump(),
        "effective_per_minute": effective,
        "limits_text": ", ".join(parts) or "none",
        "scopes": [
            {
                "scope": s.scope,
                "in_flight": s.in_flight,
                "adaptive_limit": s.adaptive_limit,
                "requests_in_window": s.requests_in_window,
                "tokens_in_window": s.tokens_in_window,
                "jobs_waiting": s.waiting,
            }
            for s in states or []
        ],
        "now_text": "; ".join(now) or ("-" if not parts else "idle"),
    }
