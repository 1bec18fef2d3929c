"""files (the OpenAI Files API), and the OpenAI Batch API's columns of `batches`

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 06:05:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

BATCH_STRINGS = (
    ("input_file_id", 64),
    ("output_file_id", 64),
    ("error_file_id", 64),
    ("endpoint", 64),
    ("completion_window", 16),
)
BATCH_TIMESTAMPS = ("in_progress_at", "finalizing_at", "failed_at", "expired_at", "cancelling_at")


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("owner_key_id", sa.String(length=36), nullable=True),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_key_id"],
            ["api_keys.id"],
            name=op.f("fk_files_owner_key_id_api_keys"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_files")),
    )
    op.create_index("ix_files_owner_key_id_id", "files", ["owner_key_id", "id"])
    # Plain ADD COLUMNs (no constraints), so SQLite does not copy `batches` (nor cascade to jobs).
    for name, length in BATCH_STRINGS:
        op.add_column("batches", sa.Column(name, sa.String(length=length), nullable=True))
    op.add_column("batches", sa.Column("errors", JSON, nullable=True))
    for name in BATCH_TIMESTAMPS:
        op.add_column("batches", sa.Column(name, sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # DROP COLUMN without a table copy (SQLite >= 3.35), so no job row is touched.
    for name in (*reversed(BATCH_TIMESTAMPS), "errors", *(n for n, _ in reversed(BATCH_STRINGS))):
        op.drop_column("batches", name)
    op.drop_index("ix_files_owner_key_id_id", table_name="files")
    op.drop_table("files")
