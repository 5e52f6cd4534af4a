"""The daemon's known rows: each account's slim ledger rows, kept between polls.

A poll compares every listed message with the account's rows
(:meth:`~popsync.ledger.messages.MessageStore.poll_rows`); for 50,000 known
messages reading them costs about as much as the whole POP3 exchange of a
poll that finds nothing new.  :class:`KnownRows` keeps the rows of each
account the daemon polls and hands them out again while the ledger says
nothing changed:

* **Validated every time.**  :meth:`KnownRows.rows` first reads the
  account's generation (one primary-key lookup,
  :mod:`popsync.ledger.generations`); the kept rows are used only if it is
  exactly the ``(epoch, generation)`` they were read or last patched at.
  Any write by anyone -- ``popsync sync`` or ``import`` in another process,
  another worker on a shared PostgreSQL ledger, a hand-made UPDATE --
  changes it, and the rows are read again.  The cache can therefore never
  show a message as delivered that the ledger does not (I2): it either
  matches the ledger or is not used.
* **Kept current by the poll's own writes.**  While the daemon polls an
  account it watches the account's writes
  (:meth:`~popsync.ledger.messages.MessageStore.watching`): each write
  re-reads the rows it changed and the new generation inside its own
  transaction, and once committed they replace the kept ones -- if the kept
  rows were at the generation that write started from.  Otherwise the rows
  are dropped and read again at the next poll.
* **Replaced, not changed.**  The dict a poll got is never modified: a patch
  builds a new one, so a poll's view stays what it read.
* **Bounded.**  Per account the same slim rows ``poll_rows`` returns (about
  150-250 bytes per known message), only for accounts the daemon polls
  that hold at least :data:`MIN_ROWS` messages (a smaller account is read
  in a few milliseconds anyway), and no more than :data:`MAX_ROWS` rows in
  all: past that the least recently polled accounts' rows are dropped (a
  worker on a shared ledger may poll thousands of accounts over time).
  :meth:`KnownRows.forget` drops accounts removed from the config.  Rows
  are read afresh at least every :data:`MAX_AGE` seconds, so a row's
  ``stale`` flag (``last_seen`` older than a day) is at most that late.

Thread-safe: the daemon polls accounts in parallel threads (one poll per
account at a time).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from popsync.ledger.generations import Generation
from popsync.ledger.messages import SEEN_REFRESH, Key, Patch, PollRow, poll_row_of

if TYPE_CHECKING:
    from popsync.ledger.store import Ledger

__all__ = ["MAX_AGE", "MAX_ROWS", "MIN_ROWS", "KnownRows"]

#: Kept rows are read afresh at least this often (seconds), so ``stale``
#: (judged against the time they were read) is never more than this late.
MAX_AGE: Final = SEEN_REFRESH / 24

#: Accounts with fewer known messages than this are read afresh every poll.
MIN_ROWS: Final = 1000

#: At most this many rows are kept over all accounts (about 150-250 MB).
MAX_ROWS: Final = 1_000_000


@dataclass
class _Entry:
    """One account's kept rows, and the generation they are at."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    rows: dict[Key, PollRow] | None = None
    generation: Generation = None
    delivery_times: bool = True
    #: When the rows were last read whole, and the poll time patches judge
    #: ``stale`` against.
    read_at: float = 0.0
    now: float = 0.0
    #: When a poll last used the entry (a counter, for dropping the least
    #: recently polled first).
    used: int = 0

    def usable(self, now: float, delivery_times: bool) -> bool:
        return (
            self.rows is not None
            and self.generation is not None
            and self.delivery_times == delivery_times
            and self.read_at <= now < self.read_at + MAX_AGE
        )

    def drop(self) -> None:
        self.rows = None
        self.generation = None


class _EntryWatcher:
    """Applies one account's own writes to its entry (a ledger ``Watcher``)."""

    def __init__(self, entry: _Entry) -> None:
        self._entry = entry

    def written(self, before: Generation, after: Generation, patch: Patch | None) -> None:
        entry = self._entry
        with entry.lock:
            if entry.rows is None:
                return
            if patch is None or before is None or entry.generation != before:
                entry.drop()
                return
            if not patch.removed and not patch.rows:
                entry.generation = after
                return
            rows = dict(entry.rows)
            for key in patch.removed:
                rows.pop(key, None)
            for key, row in patch.rows.items():
                rows[key] = poll_row_of(row, entry.now, delivery_times=entry.delivery_times)
            entry.rows = rows
            entry.generation = after


class KnownRows:
    """Each polled account's slim rows, between polls (see the module docstring)."""

    def __init__(self, *, min_rows: int | None = None, max_rows: int | None = None) -> None:
        """*min_rows*, *max_rows*: default :data:`MIN_ROWS`, :data:`MAX_ROWS`."""
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._min_rows = MIN_ROWS if min_rows is None else min_rows
        self._max_rows = MAX_ROWS if max_rows is None else max_rows
        self._clock = 0
        #: Polls served from kept rows, and whole reads (for tests and benchmarks).
        self.hits = 0
        self.reads = 0

    def _entry(self, account: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(account)
            if entry is None:
                entry = self._entries[account] = _Entry()
            self._clock += 1
            entry.used = self._clock
            return entry

    def _make_room(self, keep: _Entry, wanted: int) -> bool:
        """Drop the least recently polled accounts' rows until *wanted* more
        fit under the budget; False if they cannot (then nothing is kept).

        Another account's rows are dropped only if its lock is free at once
        (a poll holding it is using them): never waiting for a second lock
        while holding one, no two threads can deadlock here.
        """
        if wanted > self._max_rows:
            return False
        with self._lock:
            kept = [e for e in self._entries.values() if e is not keep and e.rows is not None]
        total = sum(len(e.rows or ()) for e in kept)
        for other in sorted(kept, key=lambda e: e.used):
            if total + wanted <= self._max_rows:
                break
            if other.lock.acquire(blocking=False):
                try:
                    total -= len(other.rows or ())
                    other.drop()
                finally:
                    other.lock.release()
        return total + wanted <= self._max_rows

    def rows(
        self, ledger: Ledger, account: str, now: float, *, delivery_times: bool
    ) -> dict[Key, PollRow]:
        """*account*'s rows as :meth:`Ledger.poll_rows` gives them: the kept
        ones if the ledger's generation is still theirs, else read afresh.
        The caller must not modify the dict.

        Raises:
            LedgerError: the database cannot be read.
        """
        entry = self._entry(account)
        with entry.lock:
            if entry.usable(now, delivery_times) and ledger.generation(account) == entry.generation:
                assert entry.rows is not None
                entry.now = now
                self.hits += 1
                return entry.rows
            entry.drop()
            rows, generation = ledger.poll_rows_at(account, now, delivery_times=delivery_times)
            self.reads += 1
            if (
                generation is not None
                and len(rows) >= self._min_rows
                and self._make_room(entry, len(rows))
            ):
                entry.rows, entry.generation = rows, generation
                entry.delivery_times = delivery_times
                entry.read_at = entry.now = now
            return rows

    @contextmanager
    def watching(self, ledger: Ledger, account: str) -> Iterator[None]:
        """Within the block, this thread's writes to *account* keep its rows current."""
        with ledger.watching(account, _EntryWatcher(self._entry(account))):
            yield

    def forget(self, accounts: Iterable[str]) -> None:
        """Drop the rows of these accounts (removed from the config)."""
        with self._lock:
            for account in accounts:
                self._entries.pop(account, None)

    def accounts(self) -> set[str]:
        """The accounts whose rows are kept."""
        with self._lock:
            return {name for name, entry in self._entries.items() if entry.rows is not None}
