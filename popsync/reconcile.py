"""What the delivery target already holds, turned into ledger records -- pure.

Two situations leave a copy at the target that the ledger does not call
delivered, and in both popsync must record it rather than fetch it again
(that would be a duplicate):

* **a crash** between the target's commit and the ledger's: the row is
  ``fetching`` with its committed name, and the target holds that name;
* **a lost or rebuilt ledger**: a message the plan calls new already sits at
  the target under the name popsync would give it (names are derived from a
  hash of account, unique-id and occurrence, so they can be found again).

The caller asks the target (:meth:`popsync.deliver.base.Target.recover`)
which names it holds; the functions here decide, without I/O, what the
ledger should record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from popsync.deliver.base import Held, Pending
from popsync.identity import digest_headers
from popsync.ledger import Delivered, Key, LedgerRow
from popsync.plan import Fetch


def pending_names(rows: Mapping[Key, LedgerRow]) -> dict[str, Key]:
    """Committed names of rows a crash may have left ``fetching``."""
    return {
        row.maildir_name: key
        for key, row in rows.items()
        if row.state == "fetching" and row.maildir_name is not None
    }


def pending(rows: Mapping[Key, LedgerRow], names: Mapping[str, Key]) -> list[Pending]:
    """What to ask the target about those rows: each name, with its intent."""
    return [Pending(name, rows[key].receipt) for name, key in names.items()]


def recovered(names: Mapping[str, Key], held: Iterable[Held], target: str) -> list[Delivered]:
    """Deliveries to record for the *held* copies of the rows named in *names*."""
    return [as_delivered(names[h.asked], h, target) for h in held if h.asked in names]


def split_already_held(
    fetches: Sequence[tuple[Fetch, str]], held: Iterable[Held]
) -> tuple[list[tuple[Fetch, str]], list[tuple[Fetch, Held]]]:
    """Split planned fetches (with their names) into those still to fetch and
    those the target already holds (a lost ledger)."""
    found = {h.asked: h for h in held}
    to_fetch = [(item, name) for item, name in fetches if name not in found]
    already = [(item, found[name]) for item, name in fetches if name in found]
    return to_fetch, already


def as_delivered(key: Key, held: Held, target: str) -> Delivered:
    """The ledger record of a copy found at a target of kind *target*."""
    headers = digest_headers(held.header_section)
    return Delivered(
        key[0],
        key[1],
        held.size,
        held.sha256,
        held.delivered_at,
        headers.full,
        held.wire_size,
        headers.stable,
        headers.mutable_octets,
        headers.mutable_lines,
        target,
        held.receipt or held.name,
    )
