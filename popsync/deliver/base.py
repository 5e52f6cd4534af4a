"""The one interface every delivery target implements.

A poll hands each message to its account's target in steps, and the order
of those steps is what makes "no loss" and "exactly once" hold:

1. :meth:`Target.begin` -- a draft for one message, under the name the
   ledger committed for it *before* the RETR was sent.  Names are derived
   from a hash of account, unique-id and occurrence: unique, path-safe, and
   found again after a crash;
2. :meth:`Draft.write` -- the body in chunks as it streams (never held whole
   in memory: a Maildir writes ``tmp/<name>``, the others spool to an
   unnamed temporary file, see :mod:`popsync.deliver.spool`);
3. :meth:`Target.end` -- the body is complete and the server's next reply
   showed it whole; the target may start making it durable;
4. :meth:`Target.intent` -- for targets whose copy can be recognised after a
   crash only by what was noted *before* the irreversible step (an mbox:
   the offset it appends at; IMAP: UIDNEXT and the Message-ID), a short text
   the ledger commits first.  None for targets that need nothing;
5. :meth:`Target.commit` -- a batch of ended drafts is delivered: each gets
   a :class:`Receipt` (durable at the target) or a :class:`Refusal`.  Only
   after it returns does the ledger record the receipts, and only after that
   commit may a DELE be sent.  If it raises, none of the batch counts as
   delivered (a crash's recovery sorts out what did get through).

:meth:`Target.recover` answers, after a crash, which pending messages the
target already holds: a ``fetching`` ledger row whose copy is there is
recorded as delivered instead of fetched again.

What each target can promise differs, and :attr:`Target.exactly_once` says
which: a Maildir, an mbox and an IMAP mailbox can be asked afterwards, so a
crash between their "yes" and the ledger's commit costs nothing; an MDA and
an LMTP server cannot, so there a crash may cost one duplicate -- never a
loss -- and :attr:`Target.batch` is 1 so the window is one message wide.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        """Bytes written so far (the stored form: LF line ends)."""
        ...

    @property
    def sha256_hex(self) -> str:
        """SHA-256 of the bytes written (complete once the body has ended)."""
        ...

    def write(self, data: bytes) -> None: ...

    def abort(self) -> None:
        """Throw the draft away; nothing of it is delivered.  Never raises."""


@dataclass(frozen=True, slots=True)
class Receipt:
    """Where the target durably holds a message, as the ledger records it.

    ``text`` is short and free of secrets: a Maildir file name, an mbox
    ``offset length``, an IMAP ``mailbox uidvalidity uid``, an MDA's or LMTP
    server's acknowledgement.
    """

    text: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """The target said no to one message (an MDA exit status, an LMTP or IMAP reply).

    A permanent refusal fails that message only: it stays on the server,
    undeleted, and is reported; the poll goes on.  A temporary one ends the
    account's poll as temporary; what was delivered before it stays.
    """

    text: str
    temporary: bool


@dataclass(frozen=True, slots=True)
class Pending:
    """A message a crash may have left half-way: its name and the intent noted."""

    name: str
    intent: str | None


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
    #: What the ledger records as its receipt.
    receipt: str = ""


class Target(Protocol):
    """Where an account's mail goes: maildir, mbox, mda, lmtp or imap."""

    #: The kind, as the config names it and the ledger records it.
    kind: str
    #: Most messages one :meth:`commit` may cover.
    batch: int
    #: False where the target cannot be asked after a crash (see the module doc).
    exactly_once: bool

    def reserve(self, name: str) -> None:
        """A hint: a RETR for *name* was just sent (prepare ahead if useful)."""

    def begin(self, name: str, uid: bytes) -> Draft:
        """Start writing the message committed under *name* (server unique-id
        *uid*: for an MDA's environment and for messages, never for a path)."""
        ...

    def end(self, draft: Draft) -> None:
        """The body is complete and trusted; start making it durable."""

    def intent(self, draft: Draft) -> str | None:
        """What the ledger must note before :meth:`commit` to recognise the copy later."""
        ...

    def commit(self, drafts: Sequence[Draft]) -> list[Receipt | Refusal]:
        """Deliver every draft; one result each, in order.

        Raises DeliveryError when the target itself fails (disk, connection):
        then none of them counts as delivered.
        """
        ...

    def recover(self, pending: Sequence[Pending]) -> list[Held]:
        """Which of these pending messages the target already holds.

        May also repair what a crash left half-done (an mbox truncates a
        partial append back, under its lock, if nothing came after it).
        """
        ...

    def close(self) -> None:
        """Discard unfinished drafts, release resources.  Never raises."""
