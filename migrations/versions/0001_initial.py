"""The initial ledger: messages and polls.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Timestamps are UTC epoch seconds (floats). UIDs are BLOBs, compared exactly.
UNIQUE(account, uid, occurrence) is also the index behind every per-account
lookup. Constraint names follow ``popsync.ledger.models.NAMING_CONVENTION``
(``op.f`` marks a name as final, so the convention is not applied twice).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ZERO = sa.text("0")


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account", sa.String(length=255), nullable=False),
        sa.Column("uid", sa.LargeBinary(), nullable=False),
        sa.Column("occurrence", sa.Integer(), server_default=_ZERO, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("server_size", sa.BigInteger(), nullable=False),
        sa.Column("stored_size", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("maildir_name", sa.String(length=255), nullable=True),
        sa.Column("first_seen", sa.Double(), nullable=False),
        sa.Column("delivered_at", sa.Double(), nullable=True),
        sa.Column("deleted_at", sa.Double(), nullable=True),
        sa.Column("last_seen", sa.Double(), nullable=False),
        sa.Column("skip_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        sa.UniqueConstraint(
            "account", "uid", "occurrence", name="uq_messages_account_uid_occurrence"
        ),
        sa.UniqueConstraint("account", "maildir_name", name="uq_messages_account_maildir_name"),
        sa.CheckConstraint(
            "state IN ('fetching', 'delivered', 'deleted', 'skipped')",
            name=op.f("ck_messages_state"),
        ),
        sa.CheckConstraint("occurrence >= 0", name=op.f("ck_messages_occurrence")),
    )
    op.create_table(
        "polls",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account", sa.String(length=255), nullable=False),
        sa.Column("started_at", sa.Double(), nullable=False),
        sa.Column("finished_at", sa.Double(), nullable=True),
        sa.Column("result", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("temporary", sa.Boolean(), nullable=True),
        sa.Column("listed", sa.Integer(), server_default=_ZERO, nullable=False),
        sa.Column("new", sa.Integer(), server_default=_ZERO, nullable=False),
        sa.Column("fetched", sa.Integer(), server_default=_ZERO, nullable=False),
        sa.Column("deleted", sa.Integer(), server_default=_ZERO, nullable=False),
        sa.Column("skipped", sa.Integer(), server_default=_ZERO, nullable=False),
        sa.Column("bytes", sa.BigInteger(), server_default=_ZERO, nullable=False),
        sa.Column("next_poll_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_polls"),
        sa.CheckConstraint("result IN ('ok', 'error', 'running')", name=op.f("ck_polls_result")),
    )
    op.create_index("ix_polls_account_started_at", "polls", ["account", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_polls_account_started_at", table_name="polls")
    op.drop_table("polls")
    op.drop_table("messages")
