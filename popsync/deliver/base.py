"""The one interface every delivery target implements.

A poll hands each message to its account's target in four steps, and the
order of those steps is what makes "no loss" and "exactly once" hold:

1. :meth:`Target.begin` -- a draft for one message, under the name the
   ledger committed for it *before* the RETR was sent (so a crash can be
   recovered by looking that name up);
2. :meth:`Draft.write` -- the body in chunks as it streams (never held
   whole);
3. :meth:`Target.end` -- the body is complete and the server's next reply
   showed it whole; the target may start making it durable (a Maildir
   fsyncs in the background);
4. :meth:`Target.commit` -- a batch of ended drafts becomes durable at the
   target (Maildir: fsynced files linked into ``new/``, ``new/`` fsynced).
   Only after it returns does the ledger record the batch as delivered, and
   only after that commit may a DELE be sent.  If it raises, none of the
   batch counts as delivered.

:meth:`Target.recover` answers, after a crash, which committed names the
target already holds: a ``fetching`` ledger row whose copy is there is
recorded as delivered instead of fetched again.  :attr:`Target.batch`
says how many messages may share one commit: targets that can group
durability (Maildir) take many, targets that confirm one message at a time
(an MDA, LMTP) take one, so a crash costs at most one duplicate there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


class Draft(Protocol):
    """One message on its way into a target."""

    @property
    def name(self) -> str:
        """The name committed in the ledger before the RETR."""
        ...

    @property
    def size(self) -> int:
        """Bytes written so far (the stored form)."""
        ...

    @property
    def sha256_hex(self) -> str:
        """SHA-256 of the bytes written (complete once the body has ended)."""
        ...

    def write(self, data: bytes) -> None: ...

    def abort(self) -> None:
        """Throw the draft away; nothing of it is delivered.  Never raises."""


@dataclass(frozen=True, slots=True)
class Held:
    """A message the target holds (found by :meth:`Target.recover`)."""

    #: The name it was looked up by.
    asked: str
    #: The name it is held under (a Maildir file may carry an older
    #: timestamp or host part than the name asked for, with the same hash).
    name: str
    size: int
    sha256: str
    #: Octets as the server counted them (each stored LF was a CRLF).
    wire_size: int
    #: The header section, for the identity digests of the ledger.
    header_section: bytes
    #: When it was delivered (epoch seconds).
    delivered_at: float


class Target(Protocol):
    """Where an account's mail goes: a Maildir today (mbox, MDA, LMTP, IMAP next)."""

    #: Most messages one :meth:`commit` may cover.
    batch: int

    def reserve(self, name: str) -> None:
        """A hint: a RETR for *name* was just sent (prepare ahead if useful)."""

    def begin(self, name: str) -> Draft:
        """Start writing the message committed under *name*."""
        ...

    def end(self, draft: Draft) -> None:
        """The body is complete and trusted; start making it durable."""

    def commit(self, drafts: list[Draft]) -> None:
        """Make every draft durable at the target, in one go where possible.

        Raises DeliveryError; then none of them counts as delivered.
        """

    def recover(self, names: Iterable[str]) -> list[Held]:
        """Which of these committed names the target already holds."""
        ...

    def close(self) -> None:
        """Discard unfinished drafts, release resources.  Never raises."""
