"""What ``delete_after_days`` means for one account, in words, for ``status``.

``delete_after_days`` absent keeps mail on the server (a mirror, as
fetchmail's ``keep``); 0 deletes each message once its copy is durable; N
deletes it N days after delivery.  For N, ``status`` also tells how many
delivered messages are waiting for their day, and when the next one is due:
a poll after that time DELEs it, once ``TOP n 0`` and the LIST size confirm
it is the message stored (see :mod:`popsync.identity`).
"""

from __future__ import annotations

from dataclasses import dataclass

from popsync.ledger import Ledger
from popsync.plan import DAY
from popsync.textfmt import format_duration

__all__ = ["Retention", "retention"]


@dataclass(frozen=True, slots=True)
class Retention:
    """One account's deletion policy, and for N days what it has in store."""

    delete_after_days: int | None
    #: Delivered messages waiting for their day (None unless N >= 1).
    waiting: int | None = None
    #: When the earliest of them becomes due (epoch seconds), if any.
    next_due_at: float | None = None

    @property
    def policy(self) -> str:
        """The policy in words."""
        days = self.delete_after_days
        if days is None:
            return "keeps mail on the server"
        if days == 0:
            return "deletes after delivery"
        return f"deletes {days} day{'s' if days != 1 else ''} after delivery"

    def text(self, now: float) -> str:
        """The policy and, for N days, what is waiting: one clause for ``status``."""
        if self.waiting is None:
            return self.policy
        if not self.waiting:
            return f"{self.policy}: nothing waiting"
        line = f"{self.policy}: {self.waiting} waiting"
        if self.next_due_at is None:
            return line
        if self.next_due_at <= now:
            return f"{line}, the next due now (at the next poll)"
        return f"{line}, the next due in {format_duration(self.next_due_at - now)}"


def retention(ledger: Ledger, account: str, delete_after_days: int | None) -> Retention:
    """*account*'s policy, with what the ledger holds for it when it is N days.

    Raises LedgerError when the ledger cannot be read.
    """
    if not delete_after_days:
        return Retention(delete_after_days)
    waiting, earliest = ledger.deletion_queue(account)
    due = None if earliest is None else earliest + delete_after_days * DAY
    return Retention(delete_after_days, waiting, due)
