"""Per-account message generations: a cheap "has anything changed?" for cached rows.

A daemon polls an account of 50,000 known messages every few minutes, and
most polls find nothing new; reading all 50,000 rows again each time costs
more than the whole POP3 exchange.  So the daemon keeps each account's slim
rows between polls (:mod:`popsync.ledger.rowcache`) and, at the start of a
poll, asks the ledger one question that costs one primary-key lookup: is the
account's *generation* still the one the cached rows were read at?

Where the counter lives
    Its own table, ``message_generations`` (migration 0008): one row per
    account that has messages -- ``account``, a random ``epoch`` and the
    ``generation`` number.  Not the ``accounts`` table of migration 0007:
    that one belongs to lease scheduling, has no rows on a SQLite ledger,
    and a config reload deletes and re-creates its rows.

How it is bumped
    By database triggers on ``messages``, so no writer can forget: not a
    ``popsync sync`` or ``import`` in another process, not another worker
    on PostgreSQL, not a future Ledger method, not a hand-written UPDATE in
    ``sqlite3`` or ``psql``.  An account's first message creates its row.

    SQLite has only row triggers: each inserted, updated or deleted row
    adds one (about +4 us per row; a first sync of 50,000 messages pays
    some 0.2 s).  On PostgreSQL a row trigger bumping one counter row per
    message would be quadratic -- every UPDATE of a row leaves a version the
    next one in the same transaction walks past (100,000 inserts took over
    two minutes), and statement triggers are no better, since the driver's
    ``executemany`` runs one statement per row.  So there the Ledger's own
    write transactions bump the account once, first thing
    (:data:`BUMP_POSTGRESQL`, which also locks the counter row until
    commit), and tell the trigger so with ``SET LOCAL`` of
    :data:`BUMPED_SETTING`: the row trigger's ``WHEN`` skips them at almost
    no cost.  Every other writer -- a transaction that did not set it --
    bumps through the trigger, per row; ``TRUNCATE`` bumps every account.

Never backwards, never repeated
    A cached generation is compared as the pair ``(epoch, generation)``.
    The number only grows while the row exists; a row deleted and created
    again (by hand, or by a restored backup of only some tables) gets a
    fresh random epoch, so an old pair can never match it again.

The poll's own writes
    Every Ledger write of a watched account (see
    :meth:`popsync.ledger.messages.MessageStore.watching`) reads the
    generation at its start (on PostgreSQL ``FOR UPDATE``, so no other
    writer of the account slips in between) and again before its commit,
    and re-reads the rows it changed, in the same transaction.  On SQLite
    the bumps must equal the rows the Ledger noted writing, or the cache
    reloads: a write that was not noted cannot go unseen.  If the start matched the
    cache's pair, the cache takes those rows and the new pair once the
    transaction has committed: a poll that fetched ten messages leaves the
    cache current without reading the other 49,990 rows again.  Anything
    else (a write that started from another generation, a failed commit)
    leaves the cache behind the ledger, and the next poll reloads.

Only SQL text lives here (the DDL is used both by the models for a fresh
ledger and, as a frozen copy, by migration 0008; a test compares the two).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BUMPED_SETTING",
    "BUMP_POSTGRESQL",
    "POSTGRESQL_DDL",
    "SQLITE_DDL",
    "Generation",
]

#: An account's ``(epoch, generation)``; None while it has no counter row
#: (no message was ever written for it).
Generation = tuple[str, int] | None

#: SQLite: one row trigger per kind of write.  The upsert creates the
#: account's row (with a fresh random epoch) on its first message.
SQLITE_DDL: Final = (
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

#: The transaction-local setting with which a Ledger write says it has
#: bumped the generation itself (PostgreSQL).
BUMPED_SETTING: Final = "popsync.generation_bumped"

#: A Ledger write's own bump on PostgreSQL: one per transaction, returning
#: the new ``(epoch, generation)``.
BUMP_POSTGRESQL: Final = (
    "INSERT INTO message_generations (account, epoch, generation) "
    "VALUES (:account, gen_random_uuid()::text, 1) "
    "ON CONFLICT (account) DO UPDATE SET generation = message_generations.generation + 1 "
    "RETURNING epoch, generation"
)

#: PostgreSQL: a row trigger for writers that did not bump themselves, and
#: a statement trigger for TRUNCATE (which fires no row triggers).
POSTGRESQL_DDL: Final = (
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
