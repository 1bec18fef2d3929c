"""API key generation, hashing and parsing: no I/O."""

from __future__ import annotations

import base64
import hashlib

import pytest

from api.auth import bearer_token
from promptq.keys import (
    KEY_ENTROPY_BYTES,
    LOCAL_OPERATOR,
    Principal,
    display_prefix,
    generate_key,
    hash_key,
    looks_like_key,
)


def test_keys_are_prefixed_urlsafe_and_carry_256_random_bits() -> None:
    keys = {generate_key() for _ in range(1000)}
    assert len(keys) == 1000
    for key in keys:
        assert key.startswith("pq_") and looks_like_key(key)
        body = key.removeprefix("pq_")
        assert len(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))) == KEY_ENTROPY_BYTES
        assert KEY_ENTROPY_BYTES >= 32


def test_the_stored_hash_is_sha256_and_the_prefix_is_short() -> None:
    key = generate_key()
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert len(hash_key(key)) == 64 and key not in hash_key(key)
    prefix = display_prefix(key)
    assert key.startswith(prefix) and len(prefix) <= 8  # reveals ~30 of 256 bits


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("pq_abc", True),
        ("abc", False),
        ("PQ_abc", False),
        ("pq_" + "a" * 200, False),
        ("pq_é", False),
    ],
)
def test_looks_like_key(value: str, expected: bool) -> None:
    assert looks_like_key(value) is expected


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer pq_abc", "pq_abc"),
        ("bearer pq_abc", "pq_abc"),  # the scheme is case-insensitive (RFC 7235)
        ("Bearer   pq_abc  ", "pq_abc"),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Basic pq_abc", None),
        ("pq_abc", None),
        ("Bearer pq_abc extra", None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_only_the_local_operator_may_be_keyless() -> None:
    assert LOCAL_OPERATOR.is_admin and LOCAL_OPERATOR.owner_filter is None
    assert Principal(key_id="k", name="t", is_admin=False).owner_filter == "k"
    assert Principal(key_id="k", name="a", is_admin=True).owner_filter is None
    with pytest.raises(ValueError):
        Principal(key_id=None, name="nobody", is_admin=False)
