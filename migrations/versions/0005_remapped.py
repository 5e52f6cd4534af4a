"""Remember unique-ids a server renumbered, and count them per poll.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27

* ``messages.previous_uid``: the unique-id a row had before the server
  listed its message under a new one (a migrated backend, a changed
  ``pop3_uidl_format``).  The row takes the new unique-id and keeps its
  copy and history; this keeps the one it replaced.  NULL: never renumbered.
* ``polls.remapped``: how many known messages a poll found under new
  unique-ids (and did not fetch again).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("previous_uid", sa.LargeBinary(), nullable=True))
    op.add_column(
        "polls",
        sa.Column("remapped", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )


def downgrade() -> None:
    with op.batch_alter_table("polls") as batch:
        batch.drop_column("remapped")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("previous_uid")
