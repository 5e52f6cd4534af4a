"""The ledger schema: what popsync fetched, and every poll it made.

The tables are the *description* of the schema (for Alembic autogenerate and
for readers), and the store uses them with SQLAlchemy Core, never ORM
sessions, because a poll of 100,000 messages must not build 100,000 ORM
objects.

Schema invariants (enforced by constraints where the database can):

* ``messages`` holds one row per *server message occurrence*: the key is
  ``(account, uid, occurrence)``. UIDs are opaque bytes compared exactly
  (RFC 1939 §7: 0x21-0x7E, but popsync stores whatever the server sent).
  ``occurrence`` is 0 for the first copy of a UID in a listing and k for the
  k-th further copy, because RFC 1939 §7 lets two identical messages share a
  UID.
* ``state`` is one of :data:`MESSAGE_STATES`; ``maildir_name`` is unique per
  account (two rows never claim the same file).
* Rows are never deleted when a UID vanishes from the server: the history is
  what stops a server glitch from causing re-downloads (docs/design.md §4).
* All timestamps are UTC seconds since the epoch as floats (``time.time()``),
  everywhere, so comparisons and arithmetic need no time-zone handling.

The revisions that create this schema are in ``migrations/versions/``; a test
checks that the newest one and the models agree.
"""

from __future__ import annotations

from typing import Final, Literal

from sqlalchemy import (
    DDL,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    false,
    text,
)

from popsync.ledger.generations import POSTGRESQL_DDL, SQLITE_DDL

__all__ = [
    "MESSAGE_STATES",
    "POLL_RESULTS",
    "MessageState",
    "PollResult",
    "accounts",
    "message_generations",
    "messages",
    "metadata",
    "polls",
]

#: Life of a message row: ``fetching`` (a Maildir name is reserved, RETR may be
#: under way), ``delivered`` (the file is durable, size and SHA-256 recorded),
#: ``deleted`` (DELE was confirmed by the ``+OK`` to QUIT), ``skipped`` (left
#: on the server by policy, e.g. ``max_message_size``).
MessageState = Literal["fetching", "delivered", "deleted", "skipped"]
MESSAGE_STATES: Final[tuple[MessageState, ...]] = ("fetching", "delivered", "deleted", "skipped")

#: ``running`` while a poll is under way (or after a crash interrupted it).
PollResult = Literal["ok", "error", "running"]
POLL_RESULTS: Final[tuple[PollResult, ...]] = ("ok", "error", "running")

# Deterministic constraint names, so later migrations (batch mode on SQLite)
# can refer to them.
NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _in_list(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({quoted})"


#: The ledger's schema.  Core ``Table`` objects rather than ORM classes: the
#: store works with Core only, and not importing ``sqlalchemy.orm`` saves
#: ~60 ms on every ``popsync sync`` start.
metadata = MetaData(naming_convention=NAMING_CONVENTION)

#: One server message (occurrence) popsync has seen, and what became of it.
messages = Table(
    "messages",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account", String(255), nullable=False),
    Column("uid", LargeBinary, nullable=False),
    Column("occurrence", Integer, nullable=False, default=0, server_default=text("0")),
    Column("state", String(16), nullable=False),
    Column("server_size", BigInteger, nullable=False),
    Column("stored_size", BigInteger),
    Column("sha256", String(64)),
    # The message's name at its delivery target (popsync.deliver.message_name),
    # chosen before RETR; the column kept its first name when targets other
    # than Maildir came (migration 0004).
    Column("maildir_name", String(255)),
    Column("first_seen", Double, nullable=False),
    Column("delivered_at", Double),
    Column("deleted_at", Double),
    Column("last_seen", Double, nullable=False),
    Column("skip_reason", Text),
    # SHA-256 (hex) of the stored header section (up to the first blank line),
    # compared with ``TOP n 0`` before a later DELE (migration 0002).
    Column("header_sha256", String(64)),
    # Migration 0003 (see popsync.identity): octets received as counted on the
    # wire; the header digest without the status fields mbox servers rewrite,
    # and those fields' size; failed fetch attempts; why a due DELE was last
    # withheld (reported once).
    Column("wire_size", BigInteger),
    Column("stable_sha256", String(64)),
    Column("mutable_octets", Integer),
    Column("mutable_lines", Integer),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("withheld", Text),
    # Migration 0004: the delivery target's kind, and its receipt (or, while
    # fetching, the intent it noted before its irreversible step).
    Column("target", String(16), nullable=False, server_default=text("'maildir'")),
    Column("receipt", Text),
    # Migration 0005: the unique-id the row had before the server renumbered
    # its message (the row took the new one; see Ledger.remap).
    Column("previous_uid", LargeBinary),
    # Also the index behind every per-account lookup (its prefix is account).
    UniqueConstraint("account", "uid", "occurrence"),
    UniqueConstraint("account", "maildir_name"),
    CheckConstraint(_in_list("state", MESSAGE_STATES), name="state"),
    CheckConstraint("occurrence >= 0", name="occurrence"),
)

#: One poll of one account: when, how it ended, and what it moved.
polls = Table(
    "polls",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account", String(255), nullable=False),
    Column("started_at", Double, nullable=False),
    Column("finished_at", Double),
    Column("result", String(16), nullable=False),
    # Already escaped (``escape_server_text``): safe for a terminal.
    Column("error", Text),
    Column("temporary", Boolean),
    *(
        Column(name, Integer, nullable=False, default=0, server_default=text("0"))
        for name in ("listed", "new", "fetched", "deleted", "skipped")
    ),
    Column("bytes", BigInteger, nullable=False, default=0, server_default=text("0")),
    Column("next_poll_at", Double),
    # Migration 0005: known messages found under a new unique-id.
    Column("remapped", Integer, nullable=False, default=0, server_default=text("0")),
    # Migration 0006: messages left for the next poll by the account's fetch_limit.
    Column("deferred", Integer, nullable=False, default=0, server_default=text("0")),
    Index(None, "account", "started_at"),
    CheckConstraint(_in_list("result", POLL_RESULTS), name="result"),
)

#: One configured account's turn (migration 0006, see popsync.ledger.leases):
#: when it is due and which worker holds its lease.  Times are epoch seconds
#: on the *database's* clock.
accounts = Table(
    "accounts",
    metadata,
    Column("name", String(255), primary_key=True),
    # NULL while paused (a permanent failure): no worker claims it.
    Column("next_poll_at", Double, index=True),
    Column("owner", String(255)),
    Column("lease_until", Double),
    Column("last_owner", String(255)),
    Column("last_poll_at", Double),
    Column("failures", Integer, nullable=False, server_default=text("0")),
    Column("login_delay", Integer),
    Column("paused", Boolean, nullable=False, server_default=false()),
)

#: Each account's message generation (migration 0008, see
#: popsync.ledger.generations): bumped by triggers on every write to its
#: ``messages`` rows, so a cache of those rows can tell whether it is current.
message_generations = Table(
    "message_generations",
    metadata,
    Column("account", String(255), primary_key=True),
    # Random, chosen when the row is created: a re-created row never repeats
    # an old (epoch, generation) pair.
    Column("epoch", String(36), nullable=False),
    Column("generation", BigInteger, nullable=False),
)

# The triggers that bump it, created with the tables on a fresh ledger
# (migration 0008 creates the same ones on an upgraded one).
for _dialect, _statements in (("sqlite", SQLITE_DDL), ("postgresql", POSTGRESQL_DDL)):
    for _sql in _statements:
        _trigger = DDL(_sql).execute_if(dialect=_dialect)  # type: ignore[no-untyped-call]
        event.listen(metadata, "after_create", _trigger)
