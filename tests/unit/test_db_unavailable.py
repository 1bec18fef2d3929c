"""What `is_db_unavailable` calls "the database is away": not an HTTP connection's error."""

from __future__ import annotations

import aiohttp

from promptq.db import is_db_unavailable


def test_an_http_connection_error_is_not_the_database_being_away() -> None:
    # aiohttp's errors are OSErrors too, but of an HTTP client or endpoint (ClientOSError is the
    # base of ClientConnectorError: an LLM endpoint that is away)
    assert not is_db_unavailable(aiohttp.ClientConnectionResetError("client hung up"))
    assert not is_db_unavailable(aiohttp.ClientOSError(104, "reset"))


def test_a_driver_socket_error_still_is() -> None:
    # The OSErrors a database driver raises when the server is away
    assert is_db_unavailable(ConnectionResetError(104, "Connection reset by peer"))
    assert is_db_unavailable(ConnectionRefusedError(111, "Connection refused"))
    assert is_db_unavailable(OSError("Multiple exceptions: [Errno 111] Connect call failed"))
