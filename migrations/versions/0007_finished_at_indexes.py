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


def upgrade() -> None:
    # CREATE INDEX needs no batch-mode copy of the table, on SQLite either.
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"])
    op.create_index("ix_job_attempts_finished_at", "job_attempts", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_job_attempts_finished_at", table_name="job_attempts")
    op.drop_index("ix_jobs_finished_at", table_name="jobs")
