"""Record what makes a copy complete and a message recognisable.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

* ``wire_size``: the octets received for the body, counted as the server
  counts them (a line end is two octets; RFC 1939 §11).  A DELE needs a
  copy whose size agrees with the LIST size; rows from before this revision
  have NULL and are checked against their file.
* ``stable_sha256``, ``mutable_octets``, ``mutable_lines``: the header
  section's digest without the status fields that mbox servers rewrite
  (``Status``, ``X-UID``, ...), and the size of those fields, so a message
  whose LIST size grew only by such fields is still recognised.
* ``attempts``: fetches of the message that failed; such messages are tried
  after the others, so one bad message cannot starve an account.
* ``withheld``: why a due DELE was last withheld, so the reason is reported
  once rather than on every poll.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("wire_size", "stable_sha256", "mutable_octets", "mutable_lines", "attempts", "withheld")


def upgrade() -> None:
    op.add_column("messages", sa.Column("wire_size", sa.BigInteger(), nullable=True))
    op.add_column("messages", sa.Column("stable_sha256", sa.String(length=64), nullable=True))
    op.add_column("messages", sa.Column("mutable_octets", sa.Integer(), nullable=True))
    op.add_column("messages", sa.Column("mutable_lines", sa.Integer(), nullable=True))
    op.add_column(
        "messages",
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )
    op.add_column("messages", sa.Column("withheld", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        for name in reversed(_COLUMNS):
            batch.drop_column(name)
