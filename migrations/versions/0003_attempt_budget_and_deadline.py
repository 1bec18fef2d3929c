"""attempt budget and deadline

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 03:36:08.145206
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempt_budget", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("deadline_s", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True))
    # Existing jobs never had a retry, so their budget is their max_attempts.
    op.execute("UPDATE jobs SET attempt_budget = max_attempts")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("attempt_budget", existing_type=sa.Integer(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("deadline_at")
        batch_op.drop_column("deadline_s")
        batch_op.drop_column("attempt_budget")
