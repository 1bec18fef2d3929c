"""What every `promptq` command shares: settings, consoles, one-line errors, and the database
and queue a command opens.

Output is printed exactly as it is (never read as Rich markup or :emoji: codes), and a problem
the user can fix (a bad PROMPTQ_* setting, an unusable or unreachable database, a taken port) is
one `error:` line and an exit code, not a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, NoReturn, TypeVar

import typer
from arq.connections import ArqRedis
from pydantic import ValidationError
from redis.exceptions import RedisError
from rich.console import Console
from rich.text import Text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncEngine

from promptq.db import create_engine, create_sessionmaker, redact_url
from promptq.errors import ConfigError, InvalidRequest, NotFound, PromptQError, ServiceUnavailable
from promptq.queue import QueueClient, redis_unreachable
from promptq.service import JobService
from promptq.settings import Settings
from promptq.store import JobStore

# What the CLI prints (results, model and batch names, errors) is printed exactly as it is:
# never read as Rich markup or :emoji: codes. Styles are given as Text instead.
console = Console(markup=False, emoji=False)
err_console = Console(stderr=True, markup=False, emoji=False)
T = TypeVar("T")

#: The async driver promptq uses for each database it supports.
ASYNC_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}
DATABASE_URL_EXAMPLES = "sqlite+aiosqlite:///path/promptq.db or postgresql+asyncpg://user@host/db"


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: MESSAGE` on stderr, on one line, and exit with `code`."""
    err_console.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)
    raise typer.Exit(code)


def load_settings(log_format: str | None = None) -> Settings:
    """Settings from the environment, with logging configured from them; a bad PROMPTQ_*
    variable is reported by name."""
    from promptq.logs import configure_logging

    try:
        settings = Settings()
    except ValidationError as exc:
        fail(_settings_problems(exc))
    if log_format is not None:
        settings = settings.with_overrides(log_format=log_format)
    if settings.log_level.upper() not in logging.getLevelNamesMapping():
        fail(
            f"PROMPTQ_LOG_LEVEL={settings.log_level} is not a log level: use DEBUG, INFO, "
            "WARNING or ERROR"
        )
    configure_logging(settings)
    return settings


def _settings_problems(exc: ValidationError) -> str:
    """What is wrong with which PROMPTQ_* variables, on one line (never their values)."""
    problems = [
        f"PROMPTQ_{'_'.join(map(str, error['loc'])).upper()}: {error['msg']}"
        for error in exc.errors()
    ]
    return "; ".join(problems) + " (fix the environment or the .env file)"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine, turning promptq errors into a clear message and exit code."""
    try:
        return asyncio.run(coro)
    except (InvalidRequest, NotFound) as exc:
        fail(exc.message, 2)
    except PromptQError as exc:
        fail(exc.message)


def make_engine(settings: Settings) -> AsyncEngine:
    """create_engine, with an unusable PROMPTQ_DATABASE_URL reported as ConfigError."""
    try:
        return create_engine(settings)
    except (ArgumentError, InvalidRequestError, ImportError):
        raise ConfigError(_database_url_problem(settings.resolved_database_url)) from None
    except OSError as exc:  # the SQLite file's folder cannot be created
        raise ConfigError(
            f"cannot create {exc.filename}: {exc.strerror}; set PROMPTQ_DATA_DIR or "
            "PROMPTQ_DATABASE_URL"
        ) from None


def _database_url_problem(url_text: str) -> str:
    """What to put in PROMPTQ_DATABASE_URL instead (the password never shown)."""
    try:
        url = make_url(url_text)
    except ArgumentError:
        return f"PROMPTQ_DATABASE_URL is not a database URL: use e.g. {DATABASE_URL_EXAMPLES}"
    driver = ASYNC_DRIVERS.get(url.get_backend_name())
    if driver is None:
        return (
            f"PROMPTQ_DATABASE_URL {redact_url(url_text)} is not a database promptq supports: "
            f"use SQLite or PostgreSQL, e.g. {DATABASE_URL_EXAMPLES}"
        )
    fixed = url.set(drivername=f"{url.get_backend_name()}+{driver}")
    return (
        f"PROMPTQ_DATABASE_URL {redact_url(url_text)} needs promptq's async driver: use "
        f"{fixed.render_as_string(hide_password=True)}"
    )


async def first_query(settings: Settings, query: Awaitable[T]) -> T:
    """Await a command's first database query, reporting a database it cannot use (down,
    missing, refused) as one clear error."""
    try:
        return await query
    except (DBAPIError, OSError) as exc:
        reason = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
        raise ServiceUnavailable(
            f"cannot use the database {redact_url(settings.resolved_database_url)} ({reason}): "
            "start it, or set PROMPTQ_DATABASE_URL"
        ) from None


@asynccontextmanager
async def open_database(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """An engine on the configured database, checked to be reachable and at the newest
    migration; disposed on exit."""
    from promptq.migrate import ensure_current

    # The check's "Context impl ..." INFO lines would only clutter the command's output.
    logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
    engine = make_engine(settings)
    try:
        await first_query(settings, ensure_current(engine))
        yield engine
    finally:
        await engine.dispose()


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[JobStore]:
    """A JobStore on its own (checked) engine, closed on exit. Needs no Redis."""
    async with open_database(settings) as engine:
        yield JobStore(create_sessionmaker(engine))


@asynccontextmanager
async def open_service(settings: Settings, *, read_only: bool = False) -> AsyncIterator[JobService]:
    """A JobService on its own engine and Redis pool, closed on exit.

    read_only: for commands that only read the database, whose Redis client connects only
    when used (reads never use it), so that they work while Redis is down.
    """
    async with open_store(settings) as store:
        if read_only:
            queue = QueueClient(ArqRedis.from_url(settings.redis_url), settings.queue_name)
        else:
            queue = await QueueClient.connect(settings)
        try:
            yield JobService(settings, store, queue)
        finally:
            await queue.close()


@contextmanager
def listening_on(host: str, port: int) -> Iterator[None]:
    """Report a port taken by another process, or a host that names no interface here, as one
    error line."""
    try:
        yield
    except socket.gaierror as exc:
        fail(f"cannot listen on {host!r} ({exc.strerror}); give a name or address of this machine")
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            fail(f"port {port} is in use; pick another with --port")
        if exc.errno == errno.EADDRNOTAVAIL:
            fail(f"cannot listen on {host!r}: it is not an address of this machine")
        raise


def print_columns(header: list[str], rows: list[list[str]]) -> None:
    """Plain aligned columns, whatever the terminal's width: nothing is cut or wrapped, so ids
    can be pasted into other commands and scripts can read the output."""
    table = [[name.upper() for name in header], *rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print("  ".join(cells).rstrip())


async def preflight(settings: Settings) -> None:
    """What a long-running service needs before it starts, each problem raised as one clear
    PromptQError: a valid endpoints config, the database reachable and at the newest
    migration, and Redis."""
    from promptq.endpoints import load_endpoints

    load_endpoints(settings)
    async with open_service(settings, read_only=True) as service:
        try:
            await service.queue.redis.ping()
        except (RedisError, OSError) as exc:  # at once, without arq's retries
            raise redis_unreachable(settings) from exc
