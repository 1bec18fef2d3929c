"""job chunks: checkpoints of summarize jobs, and the chunk scale each job runs at

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 03:53:37.796475
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_chunks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("level", sa.Integer(), nullable=False),
        sa.Column("chunk_index", sa.Integer(), nullable=False),
        sa.Column("text_hash", sa.String(length=64), nullable=False),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_chunks_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_chunks")),
        sa.UniqueConstraint(
            "job_id", "level", "chunk_index", "text_hash", name=op.f("uq_job_chunks_job_id")
        ),
    )
    # A plain ADD/DROP COLUMN (SQLite >= 3.35 has both): batch mode would copy `jobs` into a new
    # table and drop the old one, which with foreign keys on deletes every job_attempts row.
    op.add_column("jobs", sa.Column("chunk_scale", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "chunk_scale")
    op.drop_table("job_chunks")
