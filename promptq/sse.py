"""Reading server-sent events (`text/event-stream`), as `GET /api/jobs/{id}/stream` sends them."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class ServerEvent:
    """One event: its type (`status`, `progress`, `token`) and its JSON data."""

    event: str
    data: dict[str, Any]


async def parse_events(lines: AsyncIterable[bytes]) -> AsyncIterator[ServerEvent]:
    """The events in a stream of lines; comments (keep-alives) and unknown fields are skipped."""
    event = "message"
    data: list[str] = []
    async for raw in lines:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield ServerEvent(event, _as_object(orjson.loads("\n".join(data))))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
    if data:
        yield ServerEvent(event, _as_object(orjson.loads("\n".join(data))))


def _as_object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {"value": value}
