"""The ledger schema: what popsync fetched, and every poll it made.

The models are the *description* of the schema (for Alembic autogenerate and for
readers); the hot path in :mod:`popsync.ledger.store` uses the ``__table__``
objects with SQLAlchemy Core, never ORM sessions, because a poll of 100,000
messages must not build 100,000 ORM objects.

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
  what stops a server glitch from causing re-downloads (DESIGN §4 step 6).
* All timestamps are UTC seconds since the epoch as floats (``time.time()``),
  everywhere, so comparisons and arithmetic need no time-zone handling.

The revisions that create this schema are in ``migrations/versions/``; a test
checks that the newest one and the models agree.
"""

from __future__ import annotations

from typing import Final, Literal

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "MESSAGE_STATES",
    "POLL_RESULTS",
    "Base",
    "MessageRecord",
    "MessageState",
    "PollResult",
    "PollRow",
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


class Base(DeclarativeBase):
    """Declarative base of the ledger models."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class MessageRecord(Base):
    """One server message (occurrence) popsync has seen, and what became of it."""

    __tablename__ = "messages"
    __table_args__ = (
        # Also the index behind every per-account lookup (its prefix is account).
        UniqueConstraint("account", "uid", "occurrence"),
        UniqueConstraint("account", "maildir_name"),
        CheckConstraint(_in_list("state", MESSAGE_STATES), name="state"),
        CheckConstraint("occurrence >= 0", name="occurrence"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account: Mapped[str] = mapped_column(String(255))
    uid: Mapped[bytes] = mapped_column(LargeBinary)
    occurrence: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    state: Mapped[str] = mapped_column(String(16))
    server_size: Mapped[int] = mapped_column(BigInteger)
    stored_size: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    maildir_name: Mapped[str | None] = mapped_column(String(255))
    first_seen: Mapped[float] = mapped_column(Double)
    delivered_at: Mapped[float | None] = mapped_column(Double)
    deleted_at: Mapped[float | None] = mapped_column(Double)
    last_seen: Mapped[float] = mapped_column(Double)
    skip_reason: Mapped[str | None] = mapped_column(Text)
    #: SHA-256 (hex) of the stored header section (up to the first blank line),
    #: compared with ``TOP n 0`` before a later DELE (migration 0002).
    header_sha256: Mapped[str | None] = mapped_column(String(64))


class PollRow(Base):
    """One poll of one account: when, how it ended, and what it moved."""

    __tablename__ = "polls"
    __table_args__ = (
        Index(None, "account", "started_at"),
        CheckConstraint(_in_list("result", POLL_RESULTS), name="result"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[float] = mapped_column(Double)
    finished_at: Mapped[float | None] = mapped_column(Double)
    result: Mapped[str] = mapped_column(String(16))
    #: Already escaped (``escape_server_text``): safe for a terminal.
    error: Mapped[str | None] = mapped_column(Text)
    temporary: Mapped[bool | None] = mapped_column(Boolean)
    listed: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    new: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    fetched: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    deleted: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    skipped: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    next_poll_at: Mapped[float | None] = mapped_column(Double)
