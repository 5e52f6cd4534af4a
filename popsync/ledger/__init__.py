"""The ledger: popsync's durable record of every message it fetched, and every poll.

Public API (see :mod:`popsync.ledger.store` for the contract, and
:mod:`~popsync.ledger.messages` and :mod:`~popsync.ledger.polls` for each call)::

    ledger = Ledger.open("sqlite:////var/lib/popsync/ledger.db")
    rows = ledger.rows("home")                  # {(uid, occurrence): LedgerRow}
    slim = ledger.poll_rows("home", now)        # {(uid, occurrence): PollRow}
    ledger.generation("home")                   # (epoch, n): moves with every write
    ledger.begin_fetch("home", [FetchIntent(...)])
    ledger.mark_delivered("home", [Delivered(...)])
    ledger.mark_deleted("home", [(uid, occurrence)], at=now)
    ledger.mark_skipped("home", [Skipped(...)])
    ledger.record_attempts("home", keys, now)   # failed fetches: tried last next time
    ledger.mark_withheld("home", [(key, why)])  # a due DELE not confirmed, said once
    ledger.retire("home", keys)                 # unique-ids the server reused
    ledger.touch_seen("home", keys, now)
    poll = ledger.start_poll("home", now)
    ledger.finish_poll(poll, finished_at=..., result="ok", error=None,
                       temporary=None, counts=PollCounts(...), next_poll_at=...)
    ledger.last_polls(); ledger.counts("home"); ledger.close()

Every failure surfaces as :class:`popsync.errors.LedgerError`.
"""

from popsync.errors import LedgerError
from popsync.ledger.engine import SCHEMA_REVISION, create_ledger_engine, upgrade
from popsync.ledger.models import MESSAGE_STATES, POLL_RESULTS, MessageState, PollResult
from popsync.ledger.store import (
    SEEN_REFRESH,
    Delivered,
    FetchIntent,
    Key,
    Ledger,
    LedgerRow,
    PollCounts,
    PollRecord,
    PollRow,
    Skipped,
)

__all__ = [
    "MESSAGE_STATES",
    "POLL_RESULTS",
    "SCHEMA_REVISION",
    "SEEN_REFRESH",
    "Delivered",
    "FetchIntent",
    "Key",
    "Ledger",
    "LedgerError",
    "LedgerRow",
    "MessageState",
    "PollCounts",
    "PollRecord",
    "PollResult",
    "PollRow",
    "Skipped",
    "create_ledger_engine",
    "upgrade",
]
