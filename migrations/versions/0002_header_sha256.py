"""Remember a hash of each delivered message's header section.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

Before DELEing a message delivered in an earlier session, popsync compares
``TOP n 0`` with this hash, so a server that reuses a UID for a different
message (RFC 1939 §7 only says it "should" not) cannot make popsync delete
mail it never fetched.  Rows delivered before this revision have NULL here
and are checked by size alone, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("header_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("header_sha256")
