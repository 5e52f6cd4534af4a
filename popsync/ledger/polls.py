"""The poll log: when each account was polled, how it ended, what it moved."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, cast

from sqlalchemy import (
    delete,
    func,
    insert,
    select,
    update,
)

from popsync.errors import LedgerError
from popsync.ledger.base import LedgerBase
from popsync.ledger.models import PollResult, polls

#: How long poll records are kept (seconds): 90 days.
POLL_HISTORY: Final = 90 * 86_400.0

#: Longest poll error text stored (it is already escaped by the caller).
MAX_ERROR_TEXT: Final = 2_000


_polls = polls
_p = _polls.c


@dataclass(frozen=True, slots=True)
class PollCounts:
    """What one poll saw and did."""

    listed: int = 0
    new: int = 0
    fetched: int = 0
    deleted: int = 0
    skipped: int = 0
    bytes: int = 0
    #: Known messages found under a new unique-id (not fetched again).
    remapped: int = 0
    #: Messages left for a later poll by the account's ``fetch_limit``.
    deferred: int = 0


@dataclass(frozen=True, slots=True)
class PollRecord:
    """One ``polls`` row; ``result`` is ``running`` until :meth:`Ledger.finish_poll`."""

    id: int
    account: str
    started_at: float
    finished_at: float | None
    result: PollResult
    error: str | None
    temporary: bool | None
    counts: PollCounts
    next_poll_at: float | None


class PollLog(LedgerBase):
    """The ``polls`` table: one row per poll, kept for :data:`POLL_HISTORY`."""

    def start_poll(self, account: str, started_at: float) -> int:
        """Record the start of a poll (result ``running``); returns its id.

        Raises:
            LedgerError: the database fails.
        """
        stmt = insert(_polls).values(account=account, started_at=started_at, result="running")
        # Poll history is kept for POLL_HISTORY seconds; without this the table
        # grows by ~100,000 rows a year per account at 5-minute polls.  The
        # (account, started_at) index makes it a range delete.
        prune = delete(_polls).where(
            _p.account == account, _p.started_at < started_at - POLL_HISTORY
        )
        with self._transaction(f"record a poll of account {account}", write=True) as conn:
            conn.execute(prune)
            pk = conn.execute(stmt).inserted_primary_key
        if pk is None or pk[0] is None:
            raise LedgerError(f"ledger {self._shown}: the new poll got no id")
        return int(pk[0])

    def finish_poll(
        self,
        poll_id: int,
        *,
        finished_at: float,
        result: PollResult,
        error: str | None,
        temporary: bool | None,
        counts: PollCounts,
        next_poll_at: float | None,
    ) -> None:
        """Record how poll *poll_id* ended. *error* must already be escaped text.

        Raises:
            LedgerError: there is no such poll, *result* is not a poll result,
                or the database fails.
        """
        if error is not None and len(error) > MAX_ERROR_TEXT:
            error = error[: MAX_ERROR_TEXT - 3] + "..."
        stmt = (
            update(_polls)
            .where(_p.id == poll_id)
            .values(
                finished_at=finished_at,
                result=result,
                error=error,
                temporary=temporary,
                listed=counts.listed,
                new=counts.new,
                fetched=counts.fetched,
                deleted=counts.deleted,
                skipped=counts.skipped,
                bytes=counts.bytes,
                remapped=counts.remapped,
                deferred=counts.deferred,
                next_poll_at=next_poll_at,
            )
        )
        with self._transaction(f"record the end of poll {poll_id}", write=True) as conn:
            if conn.execute(stmt).rowcount != 1:
                raise LedgerError(f"ledger {self._shown}: there is no poll {poll_id} to finish")

    def set_next_poll(self, account: str, at: float | None) -> bool:
        """Record when the daemon will poll *account* next, on its most recent poll.

        The row updated is the one :meth:`last_polls` reports for *account*
        (latest ``started_at``, then highest id), so ``popsync status`` shows
        the time. *at* is None while the account is paused. Returns False,
        writing nothing, when the account has no poll yet.

        Raises:
            LedgerError: the database fails.
        """
        latest = (
            select(_p.id)
            .where(_p.account == account)
            .order_by(_p.started_at.desc(), _p.id.desc())
            .limit(1)
            .scalar_subquery()
        )
        stmt = update(_polls).where(_p.id == latest).values(next_poll_at=at)
        with self._transaction(f"record the next poll of account {account}", write=True) as conn:
            return bool(conn.execute(stmt).rowcount == 1)

    def last_polls(self) -> dict[str, PollRecord]:
        """The most recently started poll of every account that has one.

        Raises:
            LedgerError: the database cannot be read.
        """
        latest = (
            select(_p.account, func.max(_p.started_at).label("started_at"))
            .group_by(_p.account)
            .subquery()
        )
        stmt = (
            select(_polls)
            .join(
                latest,
                (_p.account == latest.c.account) & (_p.started_at == latest.c.started_at),
            )
            .order_by(_p.id)
        )
        out: dict[str, PollRecord] = {}
        with self._transaction("read the last polls", write=False) as conn:
            # Ordered by id, so of two polls started at the same instant the
            # later-recorded one wins.
            for r in conn.execute(stmt):
                out[r.account] = PollRecord(
                    id=r.id,
                    account=r.account,
                    started_at=r.started_at,
                    finished_at=r.finished_at,
                    result=cast(PollResult, r.result),
                    error=r.error,
                    temporary=r.temporary,
                    counts=PollCounts(
                        listed=r.listed,
                        new=r.new,
                        fetched=r.fetched,
                        deleted=r.deleted,
                        skipped=r.skipped,
                        bytes=r.bytes,
                        remapped=r.remapped,
                        deferred=r.deferred,
                    ),
                    next_poll_at=r.next_poll_at,
                )
        return out
