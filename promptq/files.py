"""Files of the OpenAI Files API, stored in the `files` table: batch input files uploaded by
users (`purpose="batch"`) and the output and error files promptq writes for finished batches
(`purpose="batch_output"`). Each file belongs to the API key that created it."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import defer

from promptq import clock
from promptq.errors import NotFound
from promptq.models import File

logger = logging.getLogger(__name__)

#: Purposes a user may upload; promptq itself writes `batch_output` files.
UPLOAD_PURPOSES = ("batch",)
OUTPUT_PURPOSE = "batch_output"
#: Longest kept file name (the column's size).
MAX_FILENAME_CHARS = 255


def new_file_id() -> str:
    """A file id in OpenAI's style, time-ordered like every promptq id."""
    return f"file-{clock.new_id()}"


def new_file(*, owner_key_id: str | None, purpose: str, filename: str, content: bytes) -> File:
    """A `files` row, not yet added to a session."""
    return File(
        id=new_file_id(),
        owner_key_id=owner_key_id,
        purpose=purpose,
        filename=filename[:MAX_FILENAME_CHARS] or "file",
        bytes=len(content),
        content=content,
        status="processed",
        created_at=clock.now(),
    )


def file_object(row: File) -> dict[str, Any]:
    """The OpenAI `file` object (without the content)."""
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": int(row.created_at.timestamp()),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": row.status,
        "status_details": None,
        "expires_at": None,
    }


class FileStore:
    """Create, read, list and delete files; `owned_by` (None for admins) scopes every read."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker

    async def create(
        self, *, owner_key_id: str | None, purpose: str, filename: str, content: bytes
    ) -> File:
        """Store an uploaded file."""
        row = new_file(
            owner_key_id=owner_key_id, purpose=purpose, filename=filename, content=content
        )
        async with self._sessionmaker() as session, session.begin():
            session.add(row)
        return row

    async def get(self, file_id: str, *, owned_by: str | None, content: bool = False) -> File:
        """The file (with its content only if asked); NotFound when missing or not theirs."""
        query = select(File).where(File.id == file_id)
        if owned_by is not None:
            query = query.where(File.owner_key_id == owned_by)
        if not content:
            query = query.options(_without_content())
        async with self._sessionmaker() as session:
            row = (await session.execute(query)).scalar_one_or_none()
        if row is None:
            raise NotFound(f"no file with id {file_id[:80]!r}")
        return row

    async def list(
        self,
        *,
        owned_by: str | None,
        purpose: str | None,
        after: str | None,
        limit: int,
        newest_first: bool,
    ) -> list[File]:
        """A page of files without content, in id (creation) order, after the `after` id."""
        query = select(File).options(_without_content()).limit(limit)
        query = query.order_by(File.id.desc() if newest_first else File.id)
        if owned_by is not None:
            query = query.where(File.owner_key_id == owned_by)
        if purpose is not None:
            query = query.where(File.purpose == purpose)
        if after is not None:
            query = query.where(File.id < after if newest_first else File.id > after)
        async with self._sessionmaker() as session:
            return list((await session.execute(query)).scalars())

    async def delete(self, file_id: str, *, owned_by: str | None) -> None:
        """Delete a file; NotFound when missing or not theirs."""
        query = delete(File).where(File.id == file_id)
        if owned_by is not None:
            query = query.where(File.owner_key_id == owned_by)
        async with self._sessionmaker() as session, session.begin():
            result = await session.execute(query)
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise NotFound(f"no file with id {file_id[:80]!r}")


def _without_content() -> Any:
    return defer(File.content)
