"""One row per account: when it is due, and which worker holds its lease.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27

Workers sharing a PostgreSQL ledger take turns through these rows
(popsync.ledger.leases): a worker claims a due account by writing its id
into ``owner`` and a ``lease_until`` a few seconds ahead (database clock),
renews the lease while the poll runs, and at the end writes the account's
next due time and clears ``owner``.

* ``next_poll_at``: when the account is due (epoch seconds, database
  clock); NULL while it is paused.
* ``owner``, ``lease_until``: the worker polling it and until when its
  claim holds; NULL when nobody does.  An expired lease is free to claim.
* ``last_owner``, ``last_poll_at``: the worker that claimed it last, and when.
* ``failures``, ``login_delay``, ``paused``: the scheduling state every
  worker continues from (temporary failures in a row, the RFC 2449 §6.5
  LOGIN-DELAY floor, a pause after a permanent failure).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("next_poll_at", sa.Double(), nullable=True),
        sa.Column("owner", sa.String(255), nullable=True),
        sa.Column("lease_until", sa.Double(), nullable=True),
        sa.Column("last_owner", sa.String(255), nullable=True),
        sa.Column("last_poll_at", sa.Double(), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("login_delay", sa.Integer(), nullable=True),
        sa.Column("paused", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.PrimaryKeyConstraint("name", name="pk_accounts"),
    )
    op.create_index("ix_accounts_next_poll_at", "accounts", ["next_poll_at"])


def downgrade() -> None:
    op.drop_index("ix_accounts_next_poll_at", table_name="accounts")
    op.drop_table("accounts")
