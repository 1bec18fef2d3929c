"""SQLite: one process's fast-path writes, many per transaction (group commit).

SQLite lets one transaction write at a time. When a worker's jobs each opened their own (a
claim, a result), they met SQLite's write lock, and a connection that finds it taken sleeps in
its busy handler (1, 2, 5, 10 ms and longer) before it looks again, which left model slots idle;
each write also cost a round trip to aiosqlite's thread and a commit.

`GroupCommit(sqlite_writes(connect)).run((write, params))` queues the write and returns its
result. A task started on demand takes everything queued since its last transaction and runs
it in one: BEGIN IMMEDIATE, each write under a savepoint of its own, COMMIT, in one trip to
aiosqlite's thread. A lone write waits one event-loop turn; under load, writes that come
together share a transaction. Each write's error is its own (its savepoint is rolled back,
the others stand); a failed BEGIN or COMMIT fails them all. Errors that mean "the database is
away" arrive as SQLAlchemy's OperationalError, as from the rest of the fast path
(promptq.db.is_db_unavailable). `GroupCommit` itself only batches: PostgreSQL's results use it
too, with a flush of their own (promptq.fastpath), and so does the worker's end-of-job
bookkeeping in Redis (worker.finishes).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import OperationalError

#: One write: runs in aiosqlite's thread inside the group's transaction.
Write = Callable[[sqlite3.Connection, dict[str, Any]], Any]
#: For each item of a batch: (True, its result) or (False, its exception).
Settled = tuple[bool, Any]
T = TypeVar("T")


class GroupCommit(Generic[T]):
    """Items that come together are flushed together: `flush(items)` runs one transaction
    for all of them and returns a Settled per item; an exception it raises fails them all."""

    def __init__(self, flush: Callable[[list[T]], Awaitable[list[Settled]]]) -> None:
        self._flush = flush
        self._pending: list[tuple[T, asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None
        #: Transactions run so far (each holds one or more items).
        self.transactions = 0

    @property
    def pending(self) -> int:
        """Items queued for the next transaction."""
        return len(self._pending)

    async def run(self, item: T) -> Any:
        """Flush `item` in a transaction shared with others; its result."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="promptq-group-commit")
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            batch = [entry for entry in batch if not entry[1].done()]  # its caller gave up
            if not batch:
                continue
            self.transactions += 1
            try:
                outcomes = await self._flush([item for item, _ in batch])
            except BaseException as exc:
                for _, future in batch:
                    if future.done():
                        continue
                    if isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:
                        future.cancel()
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)


def sqlite_writes(
    connect: Callable[[], AbstractAsyncContextManager[Any]],
) -> Callable[[list[tuple[Write, dict[str, Any]]]], Awaitable[list[Settled]]]:
    """The flush for SQLite writes: `connect()` yields a pooled aiosqlite connection
    (promptq.fastpath.FastPath._driver); each (write, params) runs as `write(db, params)`."""

    async def flush(writes: list[tuple[Write, dict[str, Any]]]) -> list[Settled]:
        try:
            async with connect() as driver:
                outcomes: list[Settled] = await driver._execute(_write_all, driver._conn, writes)
        except sqlite3.Error as exc:
            raise _translated(exc) from exc
        return [(ok, value if ok else _translated(value)) for ok, value in outcomes]

    return flush


def _translated(exc: Exception) -> Exception:
    if isinstance(exc, sqlite3.OperationalError):  # locked, busy, disk I/O, ...
        return OperationalError("promptq fast path", None, exc)
    return exc


def _in_transaction(db: sqlite3.Connection, work: Callable[[], Any]) -> Any:
    """Run `work` between BEGIN IMMEDIATE and COMMIT (rolled back if it raises)."""
    if db.in_transaction:  # never expected from a pooled connection; don't build on it
        db.rollback()
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work()
    except BaseException:
        db.rollback()
        raise
    db.commit()
    return result


def _write_all(
    db: sqlite3.Connection, writes: list[tuple[Write, dict[str, Any]]]
) -> list[tuple[bool, Any]]:
    """In aiosqlite's thread: every write in one transaction, each under its own savepoint;
    (True, result) or (False, its exception) for each: a write that fails in Python (a value
    sqlite3 cannot bind, say) fails alone too."""

    def work() -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        for write, params in writes:
            db.execute("SAVEPOINT promptq_write")
            try:
                outcomes.append((True, write(db, params)))
            except Exception as exc:
                db.execute("ROLLBACK TO promptq_write")
                outcomes.append((False, exc))
            db.execute("RELEASE promptq_write")
        return outcomes

    result: list[tuple[bool, Any]] = _in_transaction(db, work)
    return result
