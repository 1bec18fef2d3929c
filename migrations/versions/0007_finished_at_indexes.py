"""indexes on jobs.finished_at and job_attempts.finished_at (the dashboard chart's window)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 05:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: (index, table), each on the table's finished_at.
INDEXES = (("ix_jobs_finished_at", "jobs"), ("ix_job_attempts_finished_at", "job_attempts"))


def upgrade() -> None:
    context = op.get_context()
    if context.dialect.name != "postgresql":
        # CREATE INDEX needs no batch-mode copy of the table, on SQLite either.
        for index, table in INDEXES:
            op.create_index(index, table, ["finished_at"])
        return
    # On a busy database a plain CREATE INDEX would hold up every write to these tables
    # (every worker) while it reads them: build them CONCURRENTLY, which runs outside a
    # transaction. A build interrupted earlier leaves an invalid index behind: drop it first.
    with context.autocommit_block():
        for index, table in INDEXES:
            op.drop_index(index, table_name=table, postgresql_concurrently=True, if_exists=True)
            op.create_index(index, table, ["finished_at"], postgresql_concurrently=True)


def downgrade() -> None:
    for index, table in reversed(INDEXES):
        op.drop_index(index, table_name=table)
