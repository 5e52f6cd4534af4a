"""Record which delivery target holds each message, and its receipt.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27

* ``target``: the kind of delivery target (maildir, mbox, mda, lmtp, imap)
  the message went to.  Rows from before this revision were delivered into
  a Maildir, and say so.
* ``receipt``: while a row is ``fetching``, the intent a target noted before
  its irreversible step (an mbox offset, an IMAP UIDNEXT and Message-ID), so
  that recovery after a crash recognises the copy; once ``delivered``, where
  the target holds it (a Maildir file name, an mbox offset and length, an
  IMAP mailbox, UIDVALIDITY and UID).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "messages",
        sa.Column("target", sa.String(length=16), nullable=False, server_default="maildir"),
    )
    op.add_column("messages", sa.Column("receipt", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("receipt")
        batch.drop_column("target")
