"""Query and path parameters shared by the /api routes and the dashboard.

A listing is paged by `limit` and `cursor` (the id of the last row of the previous page): the
route reads `limit + 1` rows, and `split_page` keeps `limit` of them and says whether there is
a next page. Malformed parameters are an InvalidRequest (422); a malformed id in a path is a
NotFound, as for an id that does not exist.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Protocol, TypeVar

from promptq.errors import InvalidRequest, NotFound

#: Largest page a listing returns.
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50


class HasId(Protocol):
    """A row of a listing: its id is the cursor of the next page."""

    @property
    def id(self) -> str: ...


RowT = TypeVar("RowT", bound=HasId)


def page_limit(value: str | None) -> int:
    """The `limit` parameter: DEFAULT_PAGE_SIZE when absent, 1 to MAX_PAGE_SIZE."""
    if value is None or value == "":
        return DEFAULT_PAGE_SIZE
    try:
        limit = int(value)
    except ValueError:
        raise InvalidRequest(f"limit must be an integer; got {value[:64]!r}") from None
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE_SIZE}; got {limit}")
    return limit


def cursor_param(value: str | None) -> str | None:
    """The `cursor` parameter as a canonical id; None when absent."""
    if not value:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidRequest(
            f"cursor {value[:64]!r} is not valid; pass next_cursor back as is"
        ) from None


#: The largest item index a batch can have (`jobs.batch_index` is a 32-bit integer).
MAX_INDEX = 2**31 - 1


def index_cursor_param(value: str | None) -> int | None:
    """The `cursor` parameter of a page of batch items (the last item index seen); None when
    absent."""
    if not value:
        return None
    if not (value.isascii() and value.isdigit() and int(value) <= MAX_INDEX):
        raise InvalidRequest(f"cursor {value[:32]!r} is not valid; pass next_cursor back as is")
    return int(value)


def split_page(rows: Sequence[RowT], limit: int) -> tuple[list[RowT], str | None]:
    """The first `limit` of `rows` (read with `limit + 1`), and the next page's cursor (None
    on the last page)."""
    page = list(rows[:limit])
    return page, (page[-1].id if len(rows) > limit else None)


def path_id(value: str, *, noun: str) -> str:
    """An id from a route's path, canonical (any case is accepted); NotFound when it cannot
    be one."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise NotFound(f"no {noun} with id {value[:64]!r}") from None


def flag(value: str | None, name: str) -> bool:
    """A true/false parameter (also 1/0); False when absent."""
    if value is None or value == "":
        return False
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise InvalidRequest(f"{name} must be true or false; got {value[:64]!r}")


def choice(value: str | None, name: str, allowed: Sequence[str]) -> str | None:
    """A parameter that takes one of `allowed`; None when absent."""
    if value is None or value == "":
        return None
    if value not in allowed:
        raise InvalidRequest(f"{name} must be one of {', '.join(allowed)}; got {value[:64]!r}")
    return value
