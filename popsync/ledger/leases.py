"""Account leases: how workers sharing one ledger take turns at the accounts.

Every configured account has a row in ``accounts`` (migration 0006). A
worker *claims* due accounts, polls only what it claimed, and *releases*
each with its next due time:

* **Claim** (:meth:`LeaseBook.claim`): one statement that picks up to *k*
  rows that are due (``next_poll_at <= now``) and not leased (no owner, or
  a lease that has run out), locking them with ``FOR UPDATE SKIP LOCKED`` so
  that two workers claiming at the same instant pass over each other's rows
  instead of waiting or taking the same one, and writes the worker's id into
  ``owner`` with ``lease_until = now + lease``. Exactly one worker gets each
  row: the row lock is held until the claim commits, and a worker that
  skipped it then sees the new ``lease_until``.
* **Renew** (:meth:`LeaseBook.renew`): while a poll runs its worker pushes
  ``lease_until`` forward (every third of the lease); the names it no longer
  holds come back, so the worker can stop those polls early.
* **Release** (:meth:`LeaseBook.release`): the poll's outcome becomes the
  row's next due time and scheduling state, and ``owner`` is cleared.
* A worker that dies simply stops renewing: its rows are claimable once
  their lease has run out, by any other worker.

The lease is a schedule, not the exclusion: the per-account lock of
:meth:`~popsync.ledger.base.LedgerBase.account_lock` (an advisory lock that
dies with its holder) is still taken by every poll, so even a worker whose
lease ran out during a slow poll (a stalled host, a lost connection) never
overlaps with the one that took the account over: the newcomer finds the
account busy and tries again at its next turn.

**All lease times come from the database's clock** (:func:`db_now`), never
from a worker's: workers run on several hosts whose clocks may disagree by
seconds or more, and a worker whose clock ran ahead would see every other
worker's lease as expired and take over accounts still being polled. One
clock makes "expired" mean the same to everyone; only *durations* (the
lease, the delay to the next poll) come from the workers.

On SQLite (one host, one daemon) the table exists but the daemon schedules
in its own memory; these calls work there too (the tests use them), with
SQLite's own clock and without ``SKIP LOCKED`` (a write transaction there
locks the whole database anyway).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Float,
    and_,
    bindparam,
    case,
    delete,
    literal_column,
    or_,
    select,
    update,
)

from popsync.ledger.base import LedgerBase
from popsync.ledger.models import accounts

__all__ = ["Claim", "LeaseBook", "LeaseRow", "db_now"]

_a = accounts.c


def db_now(conn: Connection) -> ColumnElement[float]:
    """The database's current time as epoch seconds (a SQL expression).

    PostgreSQL: ``clock_timestamp()`` (the time of the statement, not of the
    transaction's start, so a long transaction cannot hand out leases that
    are already partly over); SQLite: ``julianday('now')`` converted.
    """
    if conn.dialect.name == "postgresql":
        return literal_column("extract(epoch from clock_timestamp())::float8", Float)
    return literal_column("((julianday('now') - 2440587.5) * 86400.0)", Float)


@dataclass(frozen=True, slots=True)
class Claim:
    """One account a worker has claimed, with the scheduling state to continue from."""

    name: str
    failures: int
    login_delay: int | None


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """One ``accounts`` row as ``popsync status`` shows it (times: database clock)."""

    name: str
    next_poll_at: float | None
    owner: str | None
    lease_until: float | None
    last_owner: str | None
    last_poll_at: float | None
    failures: int
    paused: bool


class LeaseBook(LedgerBase):
    """The ``accounts`` table: one row per configured account, claimed by one worker at a time.

    Every method is one transaction (one statement where the database allows)
    and raises :class:`~popsync.errors.LedgerError` on a database failure.
    """

    def ensure_accounts(self, names: Iterable[str]) -> int:
        """Add a row, due at once, for each of *names* that has none; returns how many.

        Existing rows (another worker's schedule) are left as they are.
        """
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return 0
        with self._transaction("add accounts to the lease table", write=True) as conn:
            have = set(conn.scalars(select(_a.name).where(_a.name.in_(wanted))))
            missing = [n for n in wanted if n not in have]
            if not missing:
                return 0
            stmt = self._insert_ignoring_conflicts(conn)
            now = conn.scalar(select(db_now(conn)))
            conn.execute(stmt, [{"name": n, "next_poll_at": now, "failures": 0} for n in missing])
        return len(missing)

    def _insert_ignoring_conflicts(self, conn: Connection) -> Any:
        # Two workers starting together both insert the same new names.
        # The dialect modules are imported here, not at the top: lease mode
        # is rare, and PostgreSQL's dialect alone costs ~35 ms of start-up
        # to every `popsync sync` of a SQLite ledger.
        if conn.dialect.name == "postgresql":
            from sqlalchemy.dialects import postgresql

            return postgresql.insert(accounts).on_conflict_do_nothing(index_elements=["name"])
        from sqlalchemy.dialects import sqlite

        return sqlite.insert(accounts).on_conflict_do_nothing(index_elements=["name"])

    def forget_accounts(self, names: Iterable[str]) -> None:
        """Delete the rows of *names* (accounts removed from the config)."""
        gone = list(names)
        if not gone:
            return
        with self._transaction("remove accounts from the lease table", write=True) as conn:
            conn.execute(delete(accounts).where(_a.name.in_(gone)))

    def reset_accounts(self, names: Iterable[str]) -> None:
        """Make *names* due at once with a fresh schedule (their config entry changed):
        no failures, no pause, no LOGIN-DELAY floor."""
        changed = list(names)
        if not changed:
            return
        with self._transaction("reschedule changed accounts", write=True) as conn:
            conn.execute(
                update(accounts)
                .where(_a.name.in_(changed))
                .values(next_poll_at=db_now(conn), failures=0, paused=False, login_delay=None)
            )

    def poll_now(self, names: Iterable[str]) -> None:
        """Make *names* due at once, paused ones included, but never sooner than the
        LOGIN-DELAY the server announced allows after the last poll's start."""
        chosen = list(names)
        if not chosen:
            return
        with self._transaction("reschedule accounts", write=True) as conn:
            now = db_now(conn)
            floor = _a.last_poll_at + _a.login_delay
            when = case((floor > now, floor), else_=now)
            conn.execute(
                update(accounts).where(_a.name.in_(chosen)).values(next_poll_at=when, paused=False)
            )

    def claim(self, owner: str, limit: int, lease: float) -> list[Claim]:
        """Claim up to *limit* due, unleased accounts for *owner* for *lease* seconds.

        The most overdue come first. One statement on PostgreSQL (an UPDATE
        of the rows a ``FOR UPDATE SKIP LOCKED`` subquery picked, RETURNING
        them): one round trip whatever *limit* is.
        """
        if limit < 1:
            return []
        with self._transaction("claim due accounts", write=True) as conn:
            now = db_now(conn)
            due = (
                select(_a.name)
                .where(
                    _a.next_poll_at <= now,
                    or_(_a.lease_until.is_(None), _a.lease_until < now),
                )
                .order_by(_a.next_poll_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            stmt = (
                update(accounts)
                .where(_a.name.in_(due.scalar_subquery()))
                .values(
                    owner=owner,
                    lease_until=now + bindparam("lease", lease, Float),
                    last_owner=owner,
                    last_poll_at=now,
                )
                .returning(_a.name, _a.failures, _a.login_delay)
            )
            return [Claim(r.name, r.failures, r.login_delay) for r in conn.execute(stmt)]

    def renew(self, owner: str, names: Iterable[str], lease: float) -> set[str]:
        """Extend *owner*'s lease on *names* to *lease* seconds from now.

        Returns the names *owner* still holds; a name missing from the answer
        was taken over (its lease had run out) or removed.
        """
        held = list(names)
        if not held:
            return set()
        with self._transaction("renew account leases", write=True) as conn:
            stmt = (
                update(accounts)
                .where(_a.name.in_(held), _a.owner == owner)
                .values(lease_until=db_now(conn) + bindparam("lease", lease, Float))
                .returning(_a.name)
            )
            return set(conn.scalars(stmt))

    def release(
        self,
        owner: str,
        name: str,
        *,
        delay: float | None,
        failures: int,
        login_delay: int | None,
    ) -> bool:
        """End *owner*'s turn at *name*: due again *delay* seconds from now (None:
        paused), with the scheduling state given.

        Written also when nobody holds the row any more (*owner*'s lease ran
        out and a newcomer found the account busy and let go: this poll's
        outcome is the better news), but not over another worker's live
        claim. Returns whether the row was written.
        """
        with self._transaction(f"release account {name}", write=True) as conn:
            when = None if delay is None else db_now(conn) + bindparam("delay", delay, Float)
            stmt = (
                update(accounts)
                .where(_a.name == name, or_(_a.owner == owner, _a.owner.is_(None)))
                .values(
                    owner=None,
                    lease_until=None,
                    next_poll_at=when,
                    failures=failures,
                    login_delay=login_delay,
                    paused=delay is None,
                )
            )
            return bool(conn.execute(stmt).rowcount == 1)

    def give_back(self, owner: str, names: Iterable[str], delay: float) -> None:
        """Release *names* unpolled, due *delay* seconds from now, state unchanged
        (claimed by a worker whose config does not list them, or that is stopping)."""
        back = list(names)
        if not back:
            return
        with self._transaction("give back account leases", write=True) as conn:
            conn.execute(
                update(accounts)
                .where(and_(_a.name.in_(back), _a.owner == owner))
                .values(
                    owner=None,
                    lease_until=None,
                    next_poll_at=db_now(conn) + bindparam("delay", delay, Float),
                )
            )

    def lease_rows(self) -> dict[str, LeaseRow]:
        """Every row of the lease table, by account name."""
        with self._transaction("read the lease table", write=False) as conn:
            return {
                r.name: LeaseRow(
                    name=r.name,
                    next_poll_at=r.next_poll_at,
                    owner=r.owner,
                    lease_until=r.lease_until,
                    last_owner=r.last_owner,
                    last_poll_at=r.last_poll_at,
                    failures=r.failures,
                    paused=bool(r.paused),
                )
                for r in conn.execute(select(accounts))
            }

    def database_time(self) -> float:
        """The database's clock, as epoch seconds."""
        with self._transaction("read the database clock", write=False) as conn:
            return float(conn.scalar(select(db_now(conn))) or 0.0)
