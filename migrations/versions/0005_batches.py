"""batches, and the job columns for batches, priorities, the result cache and cancelling

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 05:55:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("api", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("job_count", sa.Integer(), nullable=False),
        sa.Column("models", JSON, nullable=True),
        sa.Column("metadata", JSON, nullable=True),
        sa.Column("owner_key_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["owner_key_id"],
            ["api_keys.id"],
            name=op.f("fk_batches_owner_key_id_api_keys"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
    )
    op.create_index("ix_batches_owner_key_id_id", "batches", ["owner_key_id", "id"])
    # Batch mode: SQLite cannot ALTER in a foreign key. env.py turns foreign keys off while
    # batch mode copies `jobs`, so the copy's DROP does not cascade to job_attempts.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("batch_id", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("batch_index", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("custom_id", sa.String(length=255), nullable=True))
        batch_op.add_column(
            sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch_op.add_column(sa.Column("request_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("cached_from", sa.String(length=36), nullable=True))
        batch_op.add_column(
            sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_jobs_batch_id_batches"),
            "batches",
            ["batch_id"],
            ["id"],
            ondelete="CASCADE",
        )
        batch_op.create_index("ix_jobs_batch_id_batch_index", ["batch_id", "batch_index"])
        batch_op.create_index("ix_jobs_request_hash", ["request_hash"])


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_request_hash")
        batch_op.drop_index("ix_jobs_batch_id_batch_index")
        batch_op.drop_constraint(batch_op.f("fk_jobs_batch_id_batches"), type_="foreignkey")
        for column in (
            "cancel_requested_at",
            "cached_from",
            "request_hash",
            "priority",
            "custom_id",
            "batch_index",
            "batch_id",
        ):
            batch_op.drop_column(column)
    op.drop_index("ix_batches_owner_key_id_id", table_name="batches")
    op.drop_table("batches")
