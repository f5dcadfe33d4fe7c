"""A queued job says why it waits (a project's quota or the cluster's capacity): jobs.queue_reason.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07

Frozen like 0001 (no model imports); tests/store/test_store_migrations.py asserts it matches the models.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # a plain ALTER, as in 0003: a batch copy of `jobs` would cascade-delete the rows that refer to it
    op.add_column("jobs", sa.Column("queue_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "queue_reason")
