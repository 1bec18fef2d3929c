"""Engine and session factories. One AsyncEngine per process, one AsyncSession per unit of work."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from promptq.settings import Settings

logger = logging.getLogger(__name__)

#: SQLite waits this long for another process's write lock before raising "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000


#: SQLSTATE classes of "cannot reach the server": connection exceptions (08) and operator
#: intervention (57P: shutting down, starting up, admin shutdown).
_UNAVAILABLE_SQLSTATES = ("08", "57P")


def is_db_unavailable(exc: BaseException) -> bool:
    """True for errors that mean "the database is unreachable", not "the query is wrong".

    Covers SQLAlchemy's OperationalError/InterfaceError, any DBAPIError whose connection was
    invalidated or whose SQLSTATE says the server is away (a raw driver error too), and OSError.
    """
    if isinstance(exc, (OperationalError, InterfaceError, OSError)):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig if exc.orig is not None else exc
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATES)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while a worker writes; busy_timeout serialises writers across processes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_engine(settings: Settings) -> AsyncEngine:
    """Create the process's engine for the configured database (not awaited: it is lazy)."""
    url = make_url(settings.resolved_database_url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs = {}
    engine = create_async_engine(url, **kwargs)
    if url.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """A session factory whose objects stay readable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


def redact_url(url: str) -> str:
    """The URL with any password hidden, safe to log."""
    return make_url(url).render_as_string(hide_password=True)
