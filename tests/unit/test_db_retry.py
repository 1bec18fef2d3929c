"""The worker's retry of SQL writes through a database outage, and what counts as "down"."""

from __future__ import annotations

import random

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError

from promptq.db import is_db_unavailable
from worker import db_retry
from worker.db_retry import retry_db


class _Shutdown(Exception):
    sqlstate = "57P01"  # admin_shutdown, as asyncpg reports `pg_ctl stop -m fast`


def test_connection_errors_count_as_down_and_query_errors_do_not() -> None:
    assert is_db_unavailable(OperationalError("SELECT 1", {}, Exception("refused")))
    assert is_db_unavailable(InterfaceError("SELECT 1", {}, Exception("closed")))
    assert is_db_unavailable(ConnectionRefusedError())
    assert is_db_unavailable(DBAPIError("SELECT 1", {}, _Shutdown()))
    assert is_db_unavailable(_Shutdown())
    invalidated = DBAPIError("SELECT 1", {}, Exception("x"), connection_invalidated=True)
    assert is_db_unavailable(invalidated)
    assert not is_db_unavailable(IntegrityError("INSERT", {}, Exception("duplicate")))
    assert not is_db_unavailable(ValueError("bug"))


async def test_a_write_is_retried_until_the_database_answers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(db_retry, "RETRY_CAP_S", 0.01)
    calls = 0

    async def write() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise OperationalError("UPDATE", {}, ConnectionRefusedError())
        return "written"

    assert await retry_db(write, what="a write", give_up_after_s=10, rng=random.Random(1)) == (
        "written"
    )
    assert calls == 4
    assert sum("retry" in r.message for r in caplog.records) == 3


async def test_other_errors_are_not_retried_and_an_outage_is_given_up_on() -> None:
    async def bug() -> None:
        raise IntegrityError("INSERT", {}, Exception("duplicate"))

    with pytest.raises(IntegrityError):
        await retry_db(bug, what="a write", give_up_after_s=10)

    async def down() -> None:
        raise ConnectionRefusedError()

    with pytest.raises(ConnectionRefusedError):
        await retry_db(down, what="a write", give_up_after_s=0.05)
