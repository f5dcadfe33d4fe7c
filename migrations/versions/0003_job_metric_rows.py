"""Jobs count their stored metric rows: the downsampled series needs the count, and counting 100k rows per request cost more than the rest of it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

Frozen like 0001 (no model imports); tests/store/test_store_migrations.py asserts it matches the models.
Existing jobs get their count from their rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # plain ALTERs (SQLite 3.35+ drops columns itself): a batch copy of `jobs` would drop the table,
    # and with foreign keys on, that deletes every job's rows in the tables that cascade from it
    op.add_column("jobs", sa.Column("metric_rows", sa.Integer(), server_default=sa.text("0"), nullable=False))
    # one pass over metric_points; jobs without rows keep the default and are not rewritten
    op.execute(
        "UPDATE jobs SET metric_rows = "
        "(SELECT count(*) FROM metric_points WHERE metric_points.job_id = jobs.id) "
        "WHERE EXISTS (SELECT 1 FROM metric_points WHERE metric_points.job_id = jobs.id)"
    )


def downgrade() -> None:
    op.drop_column("jobs", "metric_rows")
