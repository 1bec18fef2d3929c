"""index on jobs (batch_id, id) for batch jobs: a batch's jobs listed newest first

Without it, `GET /api/jobs?batch_id=...` on PostgreSQL walked the primary key backwards from the
newest job, filtering out every job newer than the batch's. Partial: single jobs (no batch) are
most jobs, and their inserts pay nothing for it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 06:15:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_jobs_batch_id_id"
WHERE = sa.text("batch_id IS NOT NULL")


def upgrade() -> None:
    context = op.get_context()
    if context.dialect.name != "postgresql":
        op.create_index(INDEX, "jobs", ["batch_id", "id"], sqlite_where=WHERE)
        return
    # CONCURRENTLY, outside a transaction, so workers keep writing while it is built (see 0007).
    with context.autocommit_block():
        op.drop_index(INDEX, table_name="jobs", postgresql_concurrently=True, if_exists=True)
        op.create_index(
            INDEX, "jobs", ["batch_id", "id"], postgresql_where=WHERE, postgresql_concurrently=True
        )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="jobs")
