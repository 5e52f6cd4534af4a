"""What one poll will do, decided before any side effect (STYLE habit 8).

:func:`plan` is pure: from the server's listing, the ledger's rows and the
account's policy it computes which messages to fetch, which to DELE, which
to skip and why.  The executor (:mod:`popsync.sync`) only carries it out.

Rules (DESIGN §4, PROTOCOL-NOTES §3):

* A message is identified by ``(uid, occurrence)``: the k-th message the
  server lists under one UID is occurrence k (RFC 1939 §7 lets identical
  copies share a UID).  Every copy is fetched once.
* Fetch: no ledger row, or a row still ``fetching`` (an earlier attempt did
  not finish -- recovery already turned found files into ``delivered``), or
  ``skipped`` and now allowed.  Too large for ``max_message_size``: skip.
* DELE only rows ``delivered`` (or ``deleted`` yet still listed: a lost QUIT
  reply, W6) whose LIST size still equals the size recorded at fetch time
  (guards against UID reuse), whose UID is not ambiguous (listed once), and
  whose delete policy is due.  The executor also compares ``TOP n 0`` with
  the header hash recorded at delivery before sending such a DELE.
  ``delete_after_days`` None: never; 0: right after durable delivery (the
  executor DELEs those after the ledger commit that covers them); N: N days
  after delivery.
* A row that was due for deletion and is no longer listed is settled as
  ``gone`` (the deletion happened, whoever did it).  Other vanished rows
  stay as they are: history, so a server that hides mail for a while never
  causes re-downloads (DESIGN §4 step 6).
* Messages in LIST but not in UIDL wait for the next poll.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from popsync.ledger import LedgerRow

DAY = 86400.0

Key = tuple[bytes, int]


class ServerMessage(NamedTuple):
    """One message as this session's listings show it (a NamedTuple: one per
    listed message is built on every poll, so construction must be cheap)."""

    msg: int
    uid: bytes
    occurrence: int
    size: int | None  # None if LIST did not mention it


@dataclass(frozen=True, slots=True)
class Policy:
    delete_after_days: int | None = None
    max_message_size: int | None = None
    now: float = 0.0


@dataclass(frozen=True, slots=True)
class Fetch:
    message: ServerMessage
    #: The Maildir name of an earlier, unfinished attempt, to be reused.
    existing_name: str | None
    #: DELE this one as soon as the ledger commit covering it is done.
    delete_after: bool


@dataclass(frozen=True, slots=True)
class Delete:
    message: ServerMessage
    row_id: int
    #: Hash of the header section stored at delivery; ``TOP n 0`` must match it
    #: before the DELE (a guard against UID reuse).  None: size check only.
    header_sha256: str | None = None


@dataclass(frozen=True, slots=True)
class Skip:
    message: ServerMessage
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    fetch: tuple[Fetch, ...] = ()
    delete: tuple[Delete, ...] = ()
    skip: tuple[Skip, ...] = ()
    #: Rows due for deletion that the server no longer lists.
    gone: tuple[Key, ...] = ()
    #: Message numbers in LIST without a UID; they wait for the next poll.
    waiting: tuple[int, ...] = ()
    #: UIDs the server lists more than once (never DELEd by that UID).
    ambiguous: frozenset[bytes] = field(default_factory=frozenset)
    listed: int = 0


#: A listing entry as :func:`join_listings` builds it: (msg, uid, occurrence,
#: size).  Plain tuples, built at C speed; :class:`ServerMessage` is the same
#: shape with names, made only for the messages a plan acts on.
Listed = tuple[int, bytes, int, int | None]


def join_listings(
    uidl: Sequence[tuple[int, bytes]], scan: Sequence[tuple[int, int]]
) -> tuple[list[Listed], list[int]]:
    """Pair UIDL and LIST by message number; number occurrences of each UID.

    Returns (entries in message-number order, numbers listed by LIST only).
    """
    sizes = dict(scan)
    ordered = sorted(uidl)  # linear when already in order, as servers send it
    msgs = [msg for msg, _ in ordered]
    uids = [uid for _, uid in ordered]
    if len(set(uids)) == len(uids):  # the usual case: no UID listed twice
        occurrences: Iterable[int] = itertools.repeat(0)
    else:
        seen: Counter[bytes] = Counter()
        occurrences = []
        for uid in uids:
            occurrences.append(seen[uid])
            seen[uid] += 1
    messages = list(zip(msgs, uids, occurrences, map(sizes.get, msgs), strict=False))
    with_uid = set(msgs)
    waiting = sorted(msg for msg in sizes if msg not in with_uid)
    return messages, waiting


def _due(row: LedgerRow, policy: Policy) -> bool:
    days = policy.delete_after_days
    if days is None or row.delivered_at is None:
        return False
    return row.delivered_at + days * DAY <= policy.now


def needs_size(
    messages: Sequence[Listed], rows: Mapping[Key, LedgerRow], policy: Policy
) -> list[int]:
    """Message numbers whose LIST size :func:`plan` will use.

    New or unfinished messages (for ``max_message_size`` and the body cap),
    and delivered ones whose deletion is due (the size check).  A poll where
    this is empty -- the usual mirror poll with nothing new -- needs no LIST.
    """
    wanted = []
    deleting = policy.delete_after_days is not None
    get_row = rows.get
    for msg, uid, occurrence, _ in messages:
        row = get_row((uid, occurrence))
        if row is None or row.state in ("fetching", "skipped") or (deleting and _due(row, policy)):
            wanted.append(msg)
    return wanted


def plan(
    messages: Sequence[Listed],
    rows: Mapping[Key, LedgerRow],
    policy: Policy,
    waiting: Sequence[int] = (),
) -> Plan:
    """Decide the poll.  Pure: no I/O, no clock (``policy.now`` is the time)."""
    counts = Counter(uid for _, uid, _, _ in messages)
    ambiguous = frozenset(uid for uid, n in counts.items() if n > 1)
    fetch: list[Fetch] = []
    delete: list[Delete] = []
    skip: list[Skip] = []
    listed_keys: set[Key] = set()
    limit = policy.max_message_size
    deleting = policy.delete_after_days is not None
    get_row = rows.get
    for msg, uid, occurrence, size in messages:
        key = (uid, occurrence)
        listed_keys.add(key)
        row = get_row(key)
        state = row.state if row is not None else None
        if state in ("delivered", "deleted"):
            if (
                deleting
                and row is not None
                and uid not in ambiguous
                and size is not None
                and size == row.server_size
                and _due(row, policy)
            ):
                delete.append(
                    Delete(ServerMessage(msg, uid, occurrence, size), row.id, row.header_sha256)
                )
            continue
        message = ServerMessage(msg, uid, occurrence, size)
        if limit is not None and size is not None and size > limit:
            skip.append(Skip(message, f"larger than max_message_size ({limit} bytes)"))
            continue
        fetch.append(
            Fetch(
                message,
                existing_name=row.maildir_name if row is not None else None,
                delete_after=policy.delete_after_days == 0 and uid not in ambiguous,
            )
        )
    gone = tuple(
        key
        for key, row in rows.items()
        if deleting and row.state == "delivered" and key not in listed_keys and _due(row, policy)
    )
    return Plan(
        fetch=tuple(fetch),
        delete=tuple(delete),
        skip=tuple(skip),
        gone=gone,
        waiting=tuple(waiting),
        ambiguous=ambiguous,
        listed=len(messages),
    )
