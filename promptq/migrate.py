"""Run alembic migrations programmatically, against the database in Settings."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

import migrations
from promptq.db import redact_url
from promptq.errors import PromptQError
from promptq.settings import Settings

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent


def alembic_config(settings: Settings) -> Config:
    """An alembic Config pointing at our migrations and carrying `settings` to env.py."""
    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["settings"] = settings
    return config


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Migrate the database up to `revision` (blocking; call from a thread inside a loop)."""
    command.upgrade(alembic_config(settings), revision)


def downgrade(settings: Settings, revision: str) -> None:
    """Migrate the database down to `revision`."""
    command.downgrade(alembic_config(settings), revision)


def check(settings: Settings) -> None:
    """Raise if the models and the migrations disagree."""
    command.check(alembic_config(settings))


async def upgrade_async(settings: Settings, revision: str = "head") -> None:
    """`upgrade` for callers already inside an event loop."""
    await asyncio.to_thread(upgrade, settings, revision)


class SchemaOutOfDate(PromptQError):
    """The database schema is not at the latest migration."""

    code = "schema_out_of_date"
    http_status = 503


def head_revision() -> str | None:
    """The newest migration's revision id."""
    return ScriptDirectory.from_config(alembic_config(Settings())).get_current_head()


async def ensure_current(engine: AsyncEngine) -> None:
    """Raise SchemaOutOfDate, with the fix, unless the database is at the newest migration."""

    def current(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as connection:
        revision = await connection.run_sync(current)
    head = head_revision()
    if revision != head:
        raise SchemaOutOfDate(
            f"the database {redact_url(str(engine.url))} is at migration {revision or 'none'} "
            f"but this promptq needs {head}: run `promptq db upgrade`"
        )
