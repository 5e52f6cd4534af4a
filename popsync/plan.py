"""What one poll will do, decided before any side effect.

:func:`plan` is pure: from the server's listing, the ledger's rows and the
account's policy it computes which messages to fetch, which to DELE, which
to skip and why.  The executor (:mod:`popsync.sync`) only carries it out.

Rules (docs/design.md §4):

* A message is identified by ``(uid, occurrence)``: the k-th message the
  server lists under one UID is occurrence k (RFC 1939 §7 lets identical
  copies share a UID).  Every copy is fetched once.
* Fetch: no ledger row, or a row still ``fetching`` (an earlier attempt did
  not finish -- recovery already turned found files into ``delivered``), or
  ``skipped`` and now allowed.  Too large for ``max_message_size``: skip.
  A message cut off earlier for running past its LIST size stays skipped
  while the server lists it with the same size.  Messages whose fetch
  failed before come after all the others, so one message that always
  fails (too slow, cut off, broken) cannot starve the rest.
* ``fetch_limit`` N: only the first N of that order are fetched; the rest
  are *deferred* (:attr:`Plan.deferred`) and planned again next poll, in
  the same order, so each poll makes progress on the oldest first.  Due
  DELEs of mail delivered earlier are not limited.
* DELE candidates (:attr:`Plan.delete`): rows ``delivered`` (or ``deleted``
  yet still listed: a lost QUIT reply) whose UID is not ambiguous (listed
  once), whose LIST size is known, and whose delete policy is due.  They are
  only candidates: the executor DELEs one only after
  :func:`popsync.identity.judge` confirmed, from ``TOP n 0`` and the LIST
  size, that it is still the message stored, and that the stored copy is
  complete.  ``delete_after_days`` None: never; 0: right after durable
  delivery (the executor DELEs those after the ledger commit that covers
  them, in the same session: no confirmation needed); N: N days after
  delivery.
* A row that was due for deletion and is no longer listed is settled as
  ``gone`` (the deletion happened, whoever did it).  Other vanished rows
  stay as they are: history, so a server that hides mail for a while never
  causes re-downloads (docs/design.md §4).
* Messages in LIST but not in UIDL wait for the next poll.
* Renumbering (:func:`remap_candidates`, :func:`match_remaps`): before the
  plan, a listed message with an unknown unique-id may be a delivered row
  whose unique-id vanished (same LIST size, same stable ``TOP n 0``
  headers).  Only a one-to-one match counts; anything ambiguous is fetched.
"""

from __future__ import annotations

import itertools
import operator
from collections import Counter
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple, Protocol

from popsync.ledger import Key, LedgerRow, MessageState

DAY = 86400.0

#: The start of the skip reason of a message whose body ran past its LIST
#: size and was cut off: it stays skipped while listed with the same size.
CUT_OFF = "cut off: its body ran past the size the server announced"


class ServerMessage(NamedTuple):
    """One message as this session's listings show it (a NamedTuple: one per
    listed message is built on every poll, so construction must be cheap)."""

    msg: int
    uid: bytes
    occurrence: int
    size: int | None  # None if LIST did not mention it


class KnownRow(Protocol):
    """What the plan reads of a known message's row.

    The poll hands it slim :class:`popsync.ledger.PollRow` rows (every
    message of a large mailbox is compared on every poll); a whole
    :class:`popsync.ledger.LedgerRow` serves too.  ``detail`` must be the
    whole row at least while ``state`` is ``fetching`` or ``skipped``.
    """

    @property
    def state(self) -> MessageState: ...
    @property
    def delivered_at(self) -> float | None: ...
    @property
    def named(self) -> bool: ...
    @property
    def detail(self) -> LedgerRow | None: ...


def _open(row: KnownRow) -> LedgerRow:
    """The whole row of a ``fetching`` or ``skipped`` row (see :class:`KnownRow`)."""
    detail = row.detail
    if detail is None:
        raise ValueError(f"a {row.state} row came without its detail")
    return detail


@dataclass(frozen=True, slots=True)
class Policy:
    delete_after_days: int | None = None
    max_message_size: int | None = None
    now: float = 0.0
    #: Most messages to fetch (None: no limit; 0: none, this poll's budget spent).
    fetch_limit: int | None = None


@dataclass(frozen=True, slots=True)
class Fetch:
    message: ServerMessage
    #: The Maildir name of an earlier, unfinished attempt, to be reused.
    existing_name: str | None
    #: DELE this one as soon as the ledger commit covering it is done.
    delete_after: bool


@dataclass(frozen=True, slots=True)
class Delete:
    """A DELE that is due, once the message is confirmed to be the one stored.

    ``row`` is what the plan saw; the executor reads the whole row (digests,
    name) by the message's key before it confirms.
    """

    message: ServerMessage
    row: KnownRow

    @property
    def key(self) -> Key:
        return (self.message.uid, self.message.occurrence)


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
    #: The ambiguous UIDs listed with a copy the ledger has not seen yet:
    #: worth a warning now; the others were reported when they appeared.
    new_ambiguous: frozenset[bytes] = field(default_factory=frozenset)
    listed: int = 0
    #: Messages that would be fetched but for ``fetch_limit``: next poll.
    deferred: int = 0


def join_listings(
    uidl: Sequence[tuple[int, bytes]], scan: Sequence[tuple[int, int]]
) -> tuple[list[ServerMessage], list[int]]:
    """Pair UIDL and LIST by message number; number occurrences of each UID.

    Returns (entries in message-number order, numbers listed by LIST only).
    """
    # Every step is one C-level pass (map, zip, sorted, set): a mailbox of
    # 50,000 messages is joined on every poll.
    ordered = uidl if _ascending(uidl) else sorted(uidl)
    if len(set(map(_second, ordered))) == len(ordered):  # usual: no UID listed twice
        occurrences: Iterable[int] = itertools.repeat(0)
    else:
        seen: Counter[bytes] = Counter()
        occurrences = []
        for uid in map(_second, ordered):
            occurrences.append(seen[uid])
            seen[uid] += 1
    if scan:
        sizes = dict(scan)
        listed_sizes: Iterable[int | None] = map(sizes.get, map(_first, ordered))
        with_uid = set(map(_first, ordered))
        waiting = sorted(msg for msg in sizes if msg not in with_uid)
    else:
        listed_sizes, waiting = itertools.repeat(None), []
    # Occurrences and sizes may be endless repeats: the listing sets the length.
    pieces = (map(_first, ordered), map(_second, ordered), occurrences, listed_sizes)
    entries = zip(*pieces, strict=False)
    return list(map(_new_message, itertools.repeat(ServerMessage), entries)), waiting


_first = operator.itemgetter(0)
_second = operator.itemgetter(1)
_new_message = tuple.__new__  # ServerMessage._make without its Python-level call


def _ascending(entries: Sequence[tuple[int, bytes]]) -> bool:
    """Whether the message numbers of *entries* rise strictly (as servers list them)."""
    nums = list(map(_first, entries))
    return all(map(operator.lt, nums, itertools.islice(nums, 1, None)))


def _keys(messages: Sequence[ServerMessage]) -> Iterator[Key]:
    """The ledger key of each message, in order (C-level, no per-message bytecode)."""
    return zip(map(_second, messages), map(_occurrence, messages), strict=True)


_occurrence = operator.itemgetter(2)
_SETTLED: Final = frozenset({"delivered", "deleted"})


def _due(row: KnownRow, policy: Policy) -> bool:
    days = policy.delete_after_days
    # A row adopted by `popsync import` has no copy (no name) to confirm a
    # DELE against: it is never due, so it costs no LIST or TOP either.
    if days is None or row.delivered_at is None or not row.named:
        return False
    return row.delivered_at + days * DAY <= policy.now


def needs_size(
    messages: Sequence[ServerMessage], rows: Mapping[Key, KnownRow], policy: Policy
) -> list[int]:
    """Message numbers whose LIST size :func:`plan` will use.

    New or unfinished messages (for ``max_message_size`` and the body cap),
    and delivered ones whose deletion is due (the size check).  A poll where
    this is empty -- the usual mirror poll with nothing new -- needs no LIST.
    """
    deleting = policy.delete_after_days is not None
    found = map(rows.get, _keys(messages))
    return [
        message.msg
        for message, row in zip(messages, found, strict=True)
        if row is None or row.state not in _SETTLED or (deleting and _due(row, policy))
    ]


def plan(
    messages: Sequence[ServerMessage],
    rows: Mapping[Key, KnownRow],
    policy: Policy,
    waiting: Sequence[int] = (),
) -> Plan:
    """Decide the poll.  Pure: no I/O, no clock (``policy.now`` is the time).

    *messages* are numbered as :func:`join_listings` numbers them: the
    copies of a UID listed more than once have occurrences 0, 1, ...
    """
    # A UID listed twice has a second occurrence (join_listings numbers
    # them): the usual listing, without one, needs no count of 50,000 UIDs.
    if any(map(_occurrence, messages)):
        counts = Counter(map(_second, messages))
        ambiguous = frozenset(uid for uid, n in counts.items() if n > 1)
    else:
        ambiguous = frozenset()
    fetch: list[Fetch] = []
    retry: list[Fetch] = []  # failed before: after the others
    delete: list[Delete] = []
    skip: list[Skip] = []
    limit = policy.max_message_size
    deleting = policy.delete_after_days is not None
    # A settled row matters only to a policy that deletes: without one, a
    # poll with nothing new looks at no message twice.
    todo = [
        (message, row)
        for message, row in zip(messages, map(rows.get, _keys(messages)), strict=True)
        if row is None or deleting or row.state not in _SETTLED
    ]
    new_ambiguous: set[bytes] = set()
    for message, row in todo:
        _, uid, _, size = message
        if row is None and uid in ambiguous:
            new_ambiguous.add(uid)
        if row is not None and row.state in _SETTLED:
            if uid not in ambiguous and size is not None and _due(row, policy):
                delete.append(Delete(message, row))
            continue
        detail = _open(row) if row is not None else None
        if limit is not None and size is not None and size > limit:
            skip.append(Skip(message, f"larger than max_message_size ({limit} bytes)"))
            continue
        if _still_cut_off(detail, size):
            continue
        item = Fetch(
            message,
            existing_name=detail.maildir_name if detail is not None else None,
            delete_after=policy.delete_after_days == 0 and uid not in ambiguous,
        )
        (retry if detail is not None and detail.attempts else fetch).append(item)
    gone: tuple[Key, ...] = ()
    if deleting:
        listed_keys = set(_keys(messages))
        gone = tuple(
            key
            for key, row in rows.items()
            if row.state == "delivered" and key not in listed_keys and _due(row, policy)
        )
    ordered = [*fetch, *sorted(retry, key=lambda f: (_open(rows[_key(f)]).attempts, f.message.msg))]
    cap = policy.fetch_limit
    deferred = 0 if cap is None else max(0, len(ordered) - cap)
    return Plan(
        fetch=tuple(ordered[: len(ordered) - deferred]),
        delete=tuple(delete),
        skip=tuple(skip),
        gone=gone,
        waiting=tuple(waiting),
        ambiguous=ambiguous,
        new_ambiguous=frozenset(new_ambiguous),
        listed=len(messages),
        deferred=deferred,
    )


def _key(item: Fetch) -> Key:
    return (item.message.uid, item.message.occurrence)


def _still_cut_off(row: LedgerRow | None, size: int | None) -> bool:
    """A message cut off before, listed with the size it had then: leave it."""
    return (
        row is not None
        and row.state == "skipped"
        and (row.skip_reason or "").startswith(CUT_OFF)
        and size == row.server_size
    )


# -- unique-ids that changed under popsync --------------------------------------------


@dataclass(frozen=True, slots=True)
class Remap:
    """A listed message recognised as a known row whose unique-id vanished."""

    message: ServerMessage
    row: LedgerRow


def unknown_sizes(messages: Sequence[ServerMessage], rows: Container[Key]) -> set[int]:
    """The LIST sizes of the listed messages the ledger does not know: the
    sizes :meth:`popsync.ledger.Ledger.remap_rows` reads rows of (empty, the
    usual poll, when every listed message is known)."""
    # Unknown messages are always sized (see needs_size): test the size first.
    return {m.size for m in messages if m.size is not None and (m.uid, m.occurrence) not in rows}


def remap_candidates(
    messages: Sequence[ServerMessage], rows: Container[Key], delivered: Iterable[LedgerRow]
) -> dict[int, list[LedgerRow]]:
    """Which listed messages might be known rows under a new unique-id.

    A server that renumbers (a migrated backend, a changed Dovecot
    ``pop3_uidl_format``) lists known mail under unknown unique-ids, while
    the ledger's unique-ids for it vanish.  A candidate is an unknown (not
    in *rows*), sized message whose unique-id is listed once, paired with
    the ``delivered`` rows of the same LIST size whose key is no longer
    listed and whose header digest was recorded, taken from *delivered*
    (every such row of the sizes :func:`unknown_sizes` names must be among
    them; any other row is ignored).  Returns message number -> those rows;
    empty -- so the poll sends nothing more -- unless both unknown
    unique-ids and vanished rows of a matching size exist.
    """
    # Unknown messages are always sized (see needs_size): test the size first.
    unknown = [m for m in messages if m.size is not None and (m.uid, m.occurrence) not in rows]
    if not unknown:
        return {}  # the usual poll: every listed message is known
    listed = {(uid, occurrence) for _, uid, occurrence, _ in messages}
    vanished: dict[int, list[LedgerRow]] = {}
    for row in delivered:
        if row.state == "delivered" and row.stable_sha256 is not None and row.key not in listed:
            vanished.setdefault(row.server_size, []).append(row)
    if not vanished:
        return {}
    counts = Counter(uid for _, uid, _, _ in messages)
    return {
        m.msg: vanished[m.size]
        for m in unknown
        if counts[m.uid] == 1 and m.size is not None and m.size in vanished
    }


def match_remaps(
    messages: Sequence[ServerMessage],
    candidates: Mapping[int, Sequence[LedgerRow]],
    stable_digests: Mapping[int, str | None],
) -> list[Remap]:
    """Pair candidates with rows by the ``TOP n 0`` digest of their stable headers.

    *stable_digests* maps a message number to the stable digest of its
    header section (:attr:`popsync.identity.HeaderDigest.stable`), None if
    the server refused TOP.  A pair is made only when the message matches
    exactly one row and that row is matched by no other message: any
    ambiguity leaves the message to be fetched, which never loses mail.
    """
    by_msg = {m.msg: m for m in messages}
    # Messages of one size share one list of rows (thousands, for a mailbox
    # of similar small messages): index each list by digest once, so the
    # matching stays linear instead of messages x rows of their size.
    indexes: dict[int, dict[str | None, list[LedgerRow]]] = {}
    matched: dict[int, list[LedgerRow]] = {}
    claims: Counter[int] = Counter()
    for msg, rows in candidates.items():
        digest = stable_digests.get(msg)
        if digest is None:
            continue
        index = indexes.get(id(rows))
        if index is None:
            index = indexes[id(rows)] = {}
            for row in rows:
                index.setdefault(row.stable_sha256, []).append(row)
        same = index.get(digest, [])
        matched[msg] = same
        claims.update(row.id for row in same)
    return [
        Remap(by_msg[msg], same[0])
        for msg, same in sorted(matched.items())
        if len(same) == 1 and claims[same[0].id] == 1
    ]
