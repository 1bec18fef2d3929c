"""OpenAI-style list paging: `after` (the last id of the previous page) and `limit`."""

from __future__ import annotations

from aiohttp import web

from promptq.errors import InvalidRequest

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
#: Longest accepted id.
MAX_ID_CHARS = 80


def page_params(request: web.Request, *, prefix: str = "") -> tuple[str | None, int]:
    """(after, limit) from the query string; InvalidRequest (422) when malformed."""
    raw_limit = request.query.get("limit")
    if raw_limit in (None, ""):
        limit = DEFAULT_LIMIT
    else:
        try:
            limit = int(raw_limit)
        except ValueError:
            raise InvalidRequest(f"limit must be an integer; got {raw_limit[:32]!r}") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}; got {limit}")
    after = request.query.get("after") or None
    if after is not None and (len(after) > MAX_ID_CHARS or not after.startswith(prefix)):
        raise InvalidRequest(f"after must be an id from a previous page; got {after[:32]!r}")
    return after, limit
