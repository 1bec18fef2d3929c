"""Engine and session factories. One AsyncEngine per process, one AsyncSession per unit of work."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.util import await_only

from promptq.settings import Settings

logger = logging.getLogger(__name__)

#: SQLite waits this long for another process's write lock before raising "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: A pooled PostgreSQL connection idle for longer than this is pinged before it is handed out.
PING_AFTER_IDLE_S = 1.0


#: SQLSTATE classes of "cannot reach the server": connection exceptions (08) and operator
#: intervention (57P: shutting down, starting up, admin shutdown).
_UNAVAILABLE_SQLSTATES = ("08", "57P")


def is_db_unavailable(exc: BaseException) -> bool:
    """True for errors that mean "the database is unreachable", not "the query is wrong".

    Covers SQLAlchemy's OperationalError/InterfaceError, any DBAPIError whose connection was
    invalidated or whose SQLSTATE says the server is away (a raw driver error too), and OSError
    except aiohttp's: those are OSErrors too (ClientConnectionResetError: an HTTP client hung
    up), but of an HTTP connection, never of the database's. (The ConnectionResetError of a
    client that hangs up mid-body is told apart by the API's error middleware.)
    """
    if isinstance(exc, aiohttp.ClientError):
        return False
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


def _check_alive(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """Pool checkout: hand out only live PostgreSQL connections, without a ping per checkout.

    SQLAlchemy's pool_pre_ping costs three round trips on asyncpg (BEGIN, a query, ROLLBACK) on
    every checkout, i.e. on every unit of work. Instead: a connection the server closed (asyncpg
    notices the socket closing) is replaced; one idle for more than PING_AFTER_IDLE_S is pinged
    with one round trip; one in steady use is handed out as is. A connection that died
    unnoticed fails its statement, which callers treat as "database unavailable" and retry.
    """
    driver = dbapi_connection.driver_connection
    if driver.is_closed():
        raise DisconnectionError("the server closed this connection")
    now = time.monotonic()
    if now - record.info.get(_LAST_CHECKOUT, now) > PING_AFTER_IDLE_S:
        try:
            await_only(driver.fetchrow(";"))
        except Exception as exc:
            raise DisconnectionError("the connection failed its ping") from exc
    record.info[_LAST_CHECKOUT] = now


_LAST_CHECKOUT = "promptq_last_checkout"
#: Connections an engine keeps open by default (see create_engine).
DEFAULT_POOL_SIZE = 10
#: Connections an engine may open beyond its pool for a burst.
MAX_OVERFLOW = 10


def create_engine(settings: Settings, *, pool_size: int = DEFAULT_POOL_SIZE) -> AsyncEngine:
    """Create the process's engine for the configured database (not awaited: it is lazy).

    It keeps up to `pool_size` connections open (settings.db_pool_size wins), and opens up to
    MAX_OVERFLOW more for a burst, closed when returned.
    """
    url = make_url(settings.resolved_database_url)
    pool: dict[str, Any] = {
        "pool_size": settings.db_pool_size or pool_size,
        "max_overflow": MAX_OVERFLOW,
    }
    # asyncpg connections are checked by _check_alive instead of SQLAlchemy's ping. The pool
    # hands out the connection returned last (LIFO): a few hot connections, and so a few busy
    # PostgreSQL backends, instead of every job's write waking another idle backend.
    kwargs: dict[str, Any] = {
        "pool_pre_ping": url.get_driver_name() != "asyncpg",
        "pool_use_lifo": True,
        **pool,
    }
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs = pool
        else:
            kwargs = {}
    engine = create_async_engine(url, **kwargs)
    if url.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    elif url.get_driver_name() == "asyncpg":
        event.listen(engine.sync_engine, "checkout", _check_alive)
    return engine


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """A session factory whose objects stay readable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


def redact_url(url: str) -> str:
    """The URL with any password hidden, safe to log."""
    return make_url(url).render_as_string(hide_password=True)
