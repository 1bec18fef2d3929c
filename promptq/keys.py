"""API keys: generate, hash, store, look up and revoke. Only a key's SHA-256 is ever stored.

A key is `pq_` + 43 URL-safe characters (32 bytes from `secrets`), so a fast unsalted hash is
safe to store: nobody can brute-force 256 random bits, and a lookup is one indexed equality.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from promptq import clock
from promptq.errors import InvalidRequest, NotFound
from promptq.models import ApiKey

logger = logging.getLogger(__name__)

KEY_PREFIX = "pq_"
#: Random bytes in a key (256 bits).
KEY_ENTROPY_BYTES = 32
#: Characters of a key kept for display: `pq_` and 5 more, about 30 of its 256 bits.
DISPLAY_PREFIX_CHARS = 8
#: Longest string treated as a possible key; anything longer is refused before hashing.
MAX_KEY_CHARS = 128
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def generate_key() -> str:
    """A new random API key."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_ENTROPY_BYTES)


def hash_key(key: str) -> str:
    """The hex SHA-256 under which a key is stored and looked up."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def display_prefix(key: str) -> str:
    """The non-secret start of a key, for telling keys apart in listings."""
    return key[:DISPLAY_PREFIX_CHARS]


def looks_like_key(value: str) -> bool:
    """True if `value` has the shape of a promptq key (cheap check before any lookup)."""
    return value.startswith(KEY_PREFIX) and len(value) <= MAX_KEY_CHARS and value.isascii()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is making a request: an API key, or the local operator (CLI, auth disabled)."""

    #: The key's id; None only for the local operator, which is always admin.
    key_id: str | None
    name: str
    is_admin: bool

    def __post_init__(self) -> None:
        if self.key_id is None and not self.is_admin:
            raise ValueError("a principal without a key must be the (admin) local operator")

    @property
    def owner_filter(self) -> str | None:
        """The owner to restrict job queries to; None means every job (admins)."""
        return None if self.is_admin else self.key_id


#: The CLI's direct database access and the API with auth disabled: sees every job.
LOCAL_OPERATOR = Principal(key_id=None, name="local operator", is_admin=True)


class KeyStore:
    """Create, list, revoke and authenticate API keys in the `api_keys` table."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker

    async def create(self, name: str, *, admin: bool = False) -> tuple[ApiKey, str]:
        """Store a new key; returns its row and the key itself, which is never stored."""
        if not NAME_PATTERN.match(name):
            raise InvalidRequest(
                f"key name {name[:64]!r} is not valid: use 1-64 letters, digits, '.', '_' or "
                "'-', starting with a letter or digit"
            )
        key = generate_key()
        row = ApiKey(
            id=clock.new_id(),
            name=name,
            prefix=display_prefix(key),
            key_hash=hash_key(key),
            is_admin=admin,
            created_at=clock.now(),
        )
        try:
            async with self._sessionmaker() as session, session.begin():
                session.add(row)
        except IntegrityError:
            raise InvalidRequest(
                f"a key named {name!r} already exists (names are never reused, even after "
                "revocation); pick another name"
            ) from None
        logger.info("created API key %s (%s, admin=%s)", name, row.prefix, admin)
        return row, key

    async def list(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        async with self._sessionmaker() as session:
            return list((await session.execute(select(ApiKey).order_by(ApiKey.id))).scalars())

    async def revoke(self, name_or_id: str) -> ApiKey:
        """Revoke a key by name or id (again is harmless); NotFound if there is no such key."""
        async with self._sessionmaker() as session, session.begin():
            found = await session.execute(
                select(ApiKey).where(or_(ApiKey.id == name_or_id, ApiKey.name == name_or_id))
            )
            rows = sorted(found.scalars(), key=lambda r: r.id != name_or_id)  # an id wins
            if not rows:
                raise NotFound(f"no API key named {name_or_id[:64]!r}; see `promptq keys list`")
            row = rows[0]
            if row.revoked_at is None:
                row.revoked_at = clock.now()
                logger.info("revoked API key %s (%s)", row.name, row.prefix)
            return row

    async def authenticate(self, key: str) -> Principal | None:
        """The principal a key stands for, or None if it is unknown or revoked."""
        if not looks_like_key(key):
            return None
        query = select(ApiKey.id, ApiKey.name, ApiKey.is_admin).where(
            ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)
        )
        async with self._sessionmaker() as session:
            row = (await session.execute(query)).one_or_none()
        if row is None:
            return None
        return Principal(key_id=row.id, name=row.name, is_admin=row.is_admin)
