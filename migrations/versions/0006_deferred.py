"""Count, per poll, the messages ``fetch_limit`` left for the next poll.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27

* ``polls.deferred``: messages a poll would have fetched but for the
  account's ``fetch_limit``; they are fetched by later polls.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "polls",
        sa.Column("deferred", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )


def downgrade() -> None:
    with op.batch_alter_table("polls") as batch:
        batch.drop_column("deferred")
