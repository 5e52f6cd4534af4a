"""A generation number per account, bumped by triggers on every write to its messages.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27

A daemon keeps each account's known rows in memory between polls and checks
this one row at the start of a poll instead of reading them all again
(popsync.ledger.generations explains the design).

* ``message_generations``: ``account`` (primary key), ``epoch`` (random,
  chosen when the row is created, so a re-created row never repeats an old
  pair), ``generation`` (grows by one per write).
* Triggers on ``messages`` bump it: SQLite row triggers; on PostgreSQL a
  row trigger ``popsync_bump_generation()`` for writers that do not bump
  the account themselves as popsync's Ledger does (it says so with
  ``SET LOCAL popsync.generation_bumped = 'on'``), and one for TRUNCATE.
* Existing accounts get a row at generation 1.

The trigger text is a frozen copy of what a fresh ledger gets from
popsync.ledger.models; a test compares the two schemas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SQLITE: Final = (
    """CREATE TRIGGER messages_generation_insert AFTER INSERT ON messages
BEGIN
    INSERT INTO message_generations (account, epoch, generation)
    VALUES (NEW.account, lower(hex(randomblob(16))), 1)
    ON CONFLICT (account) DO UPDATE SET generation = generation + 1;
END""",
    """CREATE TRIGGER messages_generation_update AFTER UPDATE ON messages
BEGIN
    INSERT INTO message_generations (account, epoch, generation)
    VALUES (NEW.account, lower(hex(randomblob(16))), 1)
    ON CONFLICT (account) DO UPDATE SET generation = generation + 1;
    UPDATE message_generations SET generation = generation + 1
    WHERE account = OLD.account AND OLD.account <> NEW.account;
END""",
    """CREATE TRIGGER messages_generation_delete AFTER DELETE ON messages
BEGIN
    UPDATE message_generations SET generation = generation + 1
    WHERE account = OLD.account;
END""",
)

_POSTGRESQL: Final = (
    """CREATE FUNCTION popsync_bump_generation() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE message_generations SET generation = generation + 1;
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        UPDATE message_generations SET generation = generation + 1
        WHERE account = OLD.account;
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.account <> OLD.account) THEN
        INSERT INTO message_generations (account, epoch, generation)
        VALUES (NEW.account, gen_random_uuid()::text, 1)
        ON CONFLICT (account) DO UPDATE
        SET generation = message_generations.generation + 1;
    END IF;
    RETURN NULL;
END
$$""",
    """CREATE TRIGGER messages_generation AFTER INSERT OR UPDATE OR DELETE ON messages
FOR EACH ROW
WHEN (current_setting('popsync.generation_bumped', true) IS DISTINCT FROM 'on')
EXECUTE FUNCTION popsync_bump_generation()""",
    """CREATE TRIGGER messages_generation_truncate AFTER TRUNCATE ON messages
FOR EACH STATEMENT EXECUTE FUNCTION popsync_bump_generation()""",
)

# Accounts that already have messages start at generation 1.
_SEED_SQLITE: Final = (
    "INSERT INTO message_generations (account, epoch, generation) "
    "SELECT account, lower(hex(randomblob(16))), 1 FROM (SELECT DISTINCT account FROM messages)"
)
_SEED_POSTGRESQL: Final = (
    "INSERT INTO message_generations (account, epoch, generation) "
    "SELECT account, gen_random_uuid()::text, 1 FROM (SELECT DISTINCT account FROM messages) AS k"
)

_SQLITE_TRIGGERS: Final = ("insert", "update", "delete")


def upgrade() -> None:
    op.create_table(
        "message_generations",
        sa.Column("account", sa.String(255), nullable=False),
        sa.Column("epoch", sa.String(36), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("account", name="pk_message_generations"),
    )
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.execute(_SEED_POSTGRESQL if postgresql else _SEED_SQLITE)
    for sql in _POSTGRESQL if postgresql else _SQLITE:
        op.execute(sql)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER messages_generation ON messages")
        op.execute("DROP TRIGGER messages_generation_truncate ON messages")
        op.execute("DROP FUNCTION popsync_bump_generation()")
    else:
        for kind in _SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER messages_generation_{kind}")
    op.drop_table("message_generations")
