"""The ledger API: the durable record of what popsync fetched, delivered and deleted.

The ledger is the *primary* record of what is delivered: looking for a copy
at the delivery target only covers a commit lost in a crash. The poll drives
each message through the states of :data:`~popsync.ledger.models.MessageState`
in its safe order, one batch per call:

    begin_fetch (commit) → RETR into the target, target commit → mark_delivered
    (commit) → DELE … QUIT +OK → mark_deleted (commit)

Contract of every method:

* **One transaction per call**, committed before the method returns; on any
  error nothing of the call is kept (a batch is applied whole or not at all).
  With ``synchronous=FULL`` a returned write survives a power loss.
* **Thread-safe**: one engine, a pooled connection per call. Writes on SQLite
  start with ``BEGIN IMMEDIATE`` and wait for other writers (busy timeout).
* **Never a downgrade**: a delivered or deleted row never goes back to
  ``fetching`` or ``skipped``; a row's Maildir name, once chosen, never
  changes (recovery looks for that exact file). Calls that would break this
  raise instead of writing.
* **Rows are kept** when their UID disappears from the server; nothing here
  deletes message rows.
* Only :class:`~popsync.errors.LedgerError` escapes (its message names the
  database and what failed; ``temporary`` is set when the database was busy).

Hot paths use SQLAlchemy Core with executemany; :meth:`Ledger.rows` loads
100,000 rows well under a second.
"""

from __future__ import annotations

from popsync.ledger.leases import Claim, LeaseBook, LeaseRow
from popsync.ledger.messages import (
    SEEN_REFRESH,
    Delivered,
    FetchIntent,
    Key,
    LedgerRow,
    MessageStore,
    PollRow,
    Skipped,
)
from popsync.ledger.polls import PollCounts, PollLog, PollRecord

__all__ = [
    "SEEN_REFRESH",
    "Claim",
    "Delivered",
    "FetchIntent",
    "Key",
    "LeaseRow",
    "Ledger",
    "LedgerRow",
    "PollCounts",
    "PollRecord",
    "PollRow",
    "Skipped",
]


class Ledger(MessageStore, PollLog, LeaseBook):
    """The ledger of all accounts in one database: the message state machine
    (:class:`~popsync.ledger.messages.MessageStore`), the poll log
    (:class:`~popsync.ledger.polls.PollLog`) and the account leases workers
    take turns by (:class:`~popsync.ledger.leases.LeaseBook`) over one engine.

    Create it with :meth:`open`; the constructor takes an engine that is
    already at the newest schema (as :meth:`open` leaves it).
    """
