"""promptq.group_commit on a real SQLite database: writes that come together share one
transaction, each keeps its own result and its own SQL error."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from sqlalchemy.exc import OperationalError

from promptq.group_commit import GroupCommit, sqlite_writes
from tests.conftest import wait_for


@pytest.fixture
async def conn(tmp_path: Path) -> AsyncIterator[aiosqlite.Connection]:
    """An aiosqlite connection to a new database with a table `t`."""
    path = tmp_path / "group.db"
    with sqlite3.connect(path) as setup:
        setup.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
    connection = await aiosqlite.connect(path, isolation_level=None)
    yield connection
    await connection.close()


@pytest.fixture
def group(conn: aiosqlite.Connection) -> GroupCommit[Any]:
    """SQLite writes grouped on `conn`."""

    @asynccontextmanager
    async def connect() -> AsyncIterator[Any]:
        yield conn

    return GroupCommit(sqlite_writes(connect))


def insert(db: sqlite3.Connection, params: dict[str, Any]) -> int:
    """Insert a row; the number of rows now in `t` (as this transaction sees them)."""
    db.execute("INSERT INTO t (k, v) VALUES (:k, :v)", params)
    return int(db.execute("SELECT count(*) FROM t").fetchone()[0])


def rows(tmp_path: Path) -> dict[str, int]:
    """What another connection sees: committed rows only."""
    with sqlite3.connect(tmp_path / "group.db") as db:
        return dict(db.execute("SELECT k, v FROM t").fetchall())


async def test_writes_that_come_together_share_one_transaction(
    group: GroupCommit[Any], tmp_path: Path
) -> None:
    results = await asyncio.gather(
        *(group.run((insert, {"k": f"k{i}", "v": i})) for i in range(20))
    )

    assert sorted(results) == list(range(1, 21))  # each write got its own result
    assert group.transactions == 1
    assert rows(tmp_path) == {f"k{i}": i for i in range(20)}  # all committed


async def test_a_lone_write_commits_on_its_own(group: GroupCommit[Any], tmp_path: Path) -> None:
    assert await group.run((insert, {"k": "a", "v": 1})) == 1
    assert await group.run((insert, {"k": "b", "v": 2})) == 2
    assert group.transactions == 2
    assert rows(tmp_path) == {"a": 1, "b": 2}


async def test_one_writes_sql_error_is_its_own_and_the_others_commit(
    group: GroupCommit[Any], tmp_path: Path
) -> None:
    outcomes = await asyncio.gather(
        group.run((insert, {"k": "a", "v": 1})),
        group.run((insert, {"k": "a", "v": 2})),  # the same key: a constraint error
        group.run((insert, {"k": "b", "v": None})),  # NOT NULL: another
        group.run((insert, {"k": "c", "v": 3})),
        return_exceptions=True,
    )

    assert group.transactions == 1
    assert outcomes[0] == 1 and outcomes[3] == 2  # the failed writes left nothing behind
    assert isinstance(outcomes[1], sqlite3.IntegrityError)
    assert isinstance(outcomes[2], sqlite3.IntegrityError)
    assert rows(tmp_path) == {"a": 1, "c": 3}


async def test_a_value_sqlite_cannot_bind_fails_its_write_only(
    group: GroupCommit[Any], tmp_path: Path
) -> None:
    outcomes = await asyncio.gather(
        group.run((insert, {"k": "a", "v": 1})),
        group.run((insert, {"k": "lone \ud800 surrogate", "v": 2})),  # not UTF-8: fails in Python
        group.run((insert, {"k": "c", "v": 3})),
        return_exceptions=True,
    )

    assert group.transactions == 1
    assert outcomes[0] == 1 and outcomes[2] == 2
    assert isinstance(outcomes[1], UnicodeEncodeError)
    assert rows(tmp_path) == {"a": 1, "c": 3}


async def test_the_database_being_unusable_is_an_operational_error(
    group: GroupCommit[Any], conn: aiosqlite.Connection, tmp_path: Path
) -> None:
    # Another connection holds the write lock past the busy timeout: BEGIN IMMEDIATE fails
    # for the whole group, and every write hears it as "the database is unavailable".
    holder = sqlite3.connect(tmp_path / "group.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        await conn.execute("PRAGMA busy_timeout = 50")
        outcomes = await asyncio.gather(
            group.run((insert, {"k": "a", "v": 1})),
            group.run((insert, {"k": "b", "v": 2})),
            return_exceptions=True,
        )
    finally:
        holder.rollback()
        holder.close()

    assert all(isinstance(o, OperationalError) for o in outcomes), outcomes
    assert rows(tmp_path) == {}
    # and the group carries on once the database is usable again
    assert await group.run((insert, {"k": "c", "v": 3})) == 1
    assert rows(tmp_path) == {"c": 3}


async def test_a_write_whose_caller_gave_up_before_its_turn_is_not_run(
    group: GroupCommit[Any], tmp_path: Path
) -> None:
    # Another connection holds the write lock, so the first transaction waits in BEGIN
    holder = sqlite3.connect(tmp_path / "group.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        first = asyncio.create_task(group.run((insert, {"k": "a", "v": 1})))
        await wait_for(_true(lambda: group.transactions == 1), timeout_s=5)
        # A second write queues behind it, and its caller gives up before its turn
        doomed = asyncio.create_task(group.run((insert, {"k": "b", "v": 2})))
        await wait_for(_true(lambda: group.pending == 1), timeout_s=5)
        doomed.cancel()
        await wait_for(_true(doomed.done), timeout_s=5)
    finally:
        holder.rollback()
        holder.close()

    assert await asyncio.wait_for(first, timeout=10) == 1
    assert doomed.cancelled()
    assert rows(tmp_path) == {"a": 1}  # the abandoned write never ran
    assert group.transactions == 1 and group.pending == 0


def _true(condition: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return condition()

    return check
