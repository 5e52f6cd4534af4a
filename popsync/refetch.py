"""``popsync sync --refetch``: deliver again what the ledger holds as delivered
but whose copy is gone from the Maildir.

A message deleted in the mail reader by mistake, a Maildir restored from an
old backup, a file truncated by a failing disk: the ledger still says
delivered, so no ordinary poll fetches the message again.  With
``--refetch`` a poll first finds those rows and hands the ones it may fetch
to the ordinary fetch (:meth:`popsync.sync.Poll.refetch_lost` drives it):

1. **Find** (:func:`lost_copies`): each ``delivered`` row with a copy in
   this Maildir is looked up exactly as ``popsync verify`` does
   (:func:`popsync.verify.find_copies`, :func:`popsync.verify.copy_problem`):
   *missing* (no file under its name in ``new/`` or ``cur/``, by name or by
   the hash part a reader's renaming keeps) or *damaged* (its size or
   SHA-256 differs from the ledger's).  A copy that is there and intact is
   never fetched again, so no duplicate.
2. **Confirm** (:func:`on_server`, :func:`confirm`): the message must still
   be listed under its unique-id and occurrence, and
   :func:`popsync.identity.judge` must find its ``TOP n 0`` headers and LIST
   size to be the message stored -- a server that reuses unique-ids would
   otherwise hand over another message under the old name.  A message no
   longer on the server, or not confirmed, is reported and its row left as
   it is: nothing is retried in a loop.
3. **Reopen** (:meth:`popsync.ledger.Ledger.reopen`): each confirmed row goes
   from ``delivered`` back to ``fetching`` under a fresh name
   (:func:`fresh_name`), in one transaction, before any RETR.  From then on
   it is an unfinished fetch like any other: the plan fetches it (within
   ``fetch_limit``), and a crash anywhere after the reopen is recovered by
   name -- a copy found under the fresh name is recorded, else the message
   is fetched once, by the next poll with or without ``--refetch``.

A damaged file is left as it is (popsync never removes a local file); the
new copy sits beside it under its own name, and the poll names the damaged
file so the user can remove it.  Only Maildir targets: their copies can be
re-read; the ledger's word for an mbox, an MDA, LMTP or IMAP cannot be
checked this way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from popsync.deliver import message_name
from popsync.deliver.base import Held
from popsync.identity import HeaderDigest, Verdict, judge
from popsync.ledger import Key, LedgerRow
from popsync.plan import ServerMessage
from popsync.sync import stored_from, stored_of
from popsync.verify import Finder, State, copy_problem, find_copies

__all__ = ["Lost", "confirm", "fresh_name", "lost_copies", "on_server"]


@dataclass(frozen=True, slots=True)
class Lost:
    """A delivered row whose copy is missing or damaged."""

    row: LedgerRow
    state: State  # State.MISSING or State.DAMAGED
    detail: str
    #: The damaged file the target still holds (None when missing).
    held: Held | None


def lost_copies(rows: Mapping[Key, LedgerRow], finder: Finder) -> list[Lost]:
    """The ``delivered`` rows with a copy at *finder*'s target whose copy is
    missing or damaged, in ledger order.  Rows adopted from another tool (no
    copy) and rows of another kind of target are not considered.  Raises
    what the target's look-up raises (DeliveryError)."""
    delivered = [
        row
        for row in rows.values()
        if row.state == "delivered"
        and row.maildir_name is not None
        and row.sha256 is not None
        and row.target == finder.kind
    ]
    copies = find_copies(delivered, finder)
    lost = []
    for row in delivered:
        held = copies.get(row.maildir_name or "")
        problem = copy_problem(row, held)
        if problem is not None:
            lost.append(Lost(row, problem[0], problem[1], held))
    return lost


def on_server(
    lost: Sequence[Lost], messages: Sequence[ServerMessage]
) -> tuple[list[tuple[Lost, ServerMessage]], list[Lost]]:
    """Pair each lost copy with the message listed under its key (unique-id
    and occurrence) and a known size; returns (pairs, those not listed)."""
    by_key = {(m.uid, m.occurrence): m for m in messages if m.size is not None}
    listed = [(item, by_key[item.row.key]) for item in lost if item.row.key in by_key]
    gone = [item for item in lost if item.row.key not in by_key]
    return listed, gone


def confirm(
    pairs: Sequence[tuple[Lost, ServerMessage]],
    digests: Mapping[int, HeaderDigest | None],
) -> tuple[list[tuple[Lost, ServerMessage]], list[tuple[Lost, str]]]:
    """Which pairs are confirmed to be the message stored (``TOP n 0`` digest
    *digests* by message number, None where the server refused TOP), judged
    as a due DELE is; returns (confirmed, [(refused, why)])."""
    confirmed: list[tuple[Lost, ServerMessage]] = []
    refused: list[tuple[Lost, str]] = []
    for item, message in pairs:
        assert message.size is not None  # on_server pairs only sized messages
        stored = stored_of(item.row) or stored_from(item.row, item.held)
        verdict = judge(stored, message.size, digests.get(message.msg))
        if verdict.verdict is Verdict.SAME:
            confirmed.append((item, message))
        elif verdict.verdict is Verdict.OTHER:
            refused.append((item, f"the unique-id now names another message ({verdict.reason})"))
        else:
            refused.append((item, verdict.reason))
    return confirmed, refused


def fresh_name(account: str, row: LedgerRow, now: float) -> str:
    """A name for the new copy of *row*, never its current one.

    Derived from the row's current name (``<uid> refetch <name>``: a space
    never occurs in a unique-id, RFC 1939 §7), so each refetch of one message
    gets a name of its own -- a damaged file keeps the old one -- and none
    can collide with a name derived from a real unique-id.
    """
    assert row.maildir_name is not None  # lost_copies only offers rows with a copy
    seed = row.uid + b" refetch " + row.maildir_name.encode("ascii")
    return message_name(account, seed, row.occurrence, int(now))
