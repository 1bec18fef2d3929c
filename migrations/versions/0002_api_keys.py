"""api keys and owners

Adds `api_keys`, `jobs.owner_key_id`, and makes idempotency keys unique per owner: one partial
unique index over (owner_key_id, idempotency_key) for owned jobs and one over idempotency_key for
unowned jobs (NULL owners would never collide in a plain composite unique constraint).

Downgrading fails, rather than lose a job, if two owners have used the same idempotency key.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 03:36:29.432779
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OWNED = sa.text("owner_key_id IS NOT NULL")
UNOWNED = sa.text("owner_key_id IS NULL")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
        sa.UniqueConstraint("name", name=op.f("uq_api_keys_name")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner_key_id", sa.String(length=36), nullable=True))
        batch_op.drop_constraint(batch_op.f("uq_jobs_idempotency_key"), type_="unique")
        batch_op.create_foreign_key(
            batch_op.f("fk_jobs_owner_key_id_api_keys"),
            "api_keys",
            ["owner_key_id"],
            ["id"],
            ondelete="RESTRICT",
        )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_owner_key_id_id", ["owner_key_id", "id"], unique=False)
        batch_op.create_index(
            "uq_jobs_owner_key_id_idempotency_key",
            ["owner_key_id", "idempotency_key"],
            unique=True,
            sqlite_where=OWNED,
            postgresql_where=OWNED,
        )
        batch_op.create_index(
            "uq_jobs_unowned_idempotency_key",
            ["idempotency_key"],
            unique=True,
            sqlite_where=UNOWNED,
            postgresql_where=UNOWNED,
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("uq_jobs_unowned_idempotency_key")
        batch_op.drop_index("uq_jobs_owner_key_id_idempotency_key")
        batch_op.drop_index("ix_jobs_owner_key_id_id")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_jobs_owner_key_id_api_keys"), type_="foreignkey")
        batch_op.create_unique_constraint(
            batch_op.f("uq_jobs_idempotency_key"), ["idempotency_key"]
        )
        batch_op.drop_column("owner_key_id")

    op.drop_table("api_keys")
