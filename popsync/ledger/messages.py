"""The message state machine: what became of each server message, per account.

States (``popsync.ledger.models.MESSAGE_STATES``) move only forward, one batch
per call: ``fetching`` (a name committed before RETR) -> ``delivered`` (durable
at the target) -> ``deleted`` (after ``+OK`` to QUIT); ``skipped`` is left on
the server by policy.  Rows are kept when a unique-id disappears from the
server, so a glitch that hides mail never causes re-downloads.

One move goes back, and only when the user asks for it (``popsync sync
--refetch``): :meth:`MessageStore.reopen` turns a ``delivered`` row whose
copy is gone back into ``fetching`` under a fresh name, so the ordinary
fetch -- and its crash recovery -- delivers it once more.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, Protocol, TypeVar

from sqlalchemy import (
    ClauseElement,
    Connection,
    bindparam,
    case,
    func,
    insert,
    literal_column,
    null,
    select,
    text,
    update,
)

from popsync.errors import LedgerError
from popsync.ledger.base import LedgerBase
from popsync.ledger.generations import BUMP_POSTGRESQL, BUMPED_SETTING, Generation
from popsync.ledger.models import MESSAGE_STATES, MessageState, message_generations, messages

#: ``last_seen`` is refreshed at most this often (seconds), so a poll that
#: finds nothing new does not rewrite every row of a large mailbox.
SEEN_REFRESH: Final = 86_400.0


# UIDs per "uid IN (...)" query: far below SQLite's bound-parameter limit.
_IN_CHUNK: Final = 500

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

_messages = messages
_m = _messages.c

#: A message as the ledger knows it: its unique-id and its occurrence (the
#: k-th message the server lists under that unique-id, from 0).
Key = tuple[bytes, int]


class LedgerRow(NamedTuple):
    """One ``messages`` row. Field order matches the table (see :data:`_ROW_COLUMNS`).

    A NamedTuple rather than a frozen dataclass: :meth:`Ledger.rows` builds one
    per message of the account on every poll, and a tuple is built ten times
    faster (50,000 rows: ~25 ms instead of ~250 ms).
    """

    id: int
    account: str
    uid: bytes
    occurrence: int
    state: MessageState
    server_size: int
    stored_size: int | None
    sha256: str | None
    maildir_name: str | None
    first_seen: float
    delivered_at: float | None
    deleted_at: float | None
    last_seen: float
    skip_reason: str | None
    header_sha256: str | None
    wire_size: int | None
    stable_sha256: str | None
    mutable_octets: int | None
    mutable_lines: int | None
    attempts: int
    withheld: str | None
    target: str
    receipt: str | None
    #: The unique-id before the server last renumbered this message.
    previous_uid: bytes | None = None

    @property
    def key(self) -> Key:
        return (self.uid, self.occurrence)

    @property
    def named(self) -> bool:
        """The row has a name at its target (a row adopted by ``popsync import`` has none)."""
        return self.maildir_name is not None

    @property
    def detail(self) -> LedgerRow:
        """The whole row: itself (so a full row serves wherever a :class:`PollRow` does)."""
        return self


class PollRow(NamedTuple):
    """What one poll needs of *every* known message: the slim row of :meth:`MessageStore.poll_rows`.

    A poll of a large mailbox where nothing is new compares every listed
    message with its row; holding 24 columns for each cost ~1.3 KB per
    message.  This is the part the plan reads for a settled (``delivered``
    or ``deleted``) row -- its state, whether and when it was delivered to a
    copy -- and ``detail``, the whole row, only for rows still open
    (``fetching`` or ``skipped``: few, and the plan needs their name, size,
    skip reason and failed attempts).  Anything else of a settled row (a due
    DELE's digests, a renumbered row's header digest) is read by key when it
    is needed (:meth:`MessageStore.rows_by_key`, :meth:`MessageStore.remap_rows`).
    """

    state: MessageState
    #: None if not asked for (see :meth:`MessageStore.poll_rows`).
    delivered_at: float | None
    #: The row has a name at its target (see :attr:`LedgerRow.named`).
    named: bool
    #: ``last_seen`` was older than :data:`SEEN_REFRESH` when the row was read.
    stale: bool
    #: The whole row if ``state`` is ``fetching`` or ``skipped``, else None.
    detail: LedgerRow | None


#: The states whose rows :meth:`MessageStore.poll_rows` loads whole.
OPEN_STATES: Final = ("fetching", "skipped")


def poll_row_of(row: LedgerRow, now: float, *, delivery_times: bool = True) -> PollRow:
    """The slim row :meth:`MessageStore.poll_rows` would give for *row* at *now*."""
    return PollRow(
        row.state,
        row.delivered_at if delivery_times else None,
        row.named,
        row.last_seen < now - SEEN_REFRESH,
        row if row.state in OPEN_STATES else None,
    )


_ROW_COLUMNS: Final = tuple(_messages.c[name] for name in LedgerRow._fields)


@dataclass(frozen=True, slots=True)
class FetchIntent:
    """About to RETR ``(uid, occurrence)`` into the Maildir file ``maildir_name``."""

    uid: bytes
    occurrence: int
    server_size: int
    maildir_name: str
    now: float


@dataclass(frozen=True, slots=True)
class Delivered:
    """The copy is durable at the delivery target (e.g. a Maildir file and
    directory fsynced)."""

    uid: bytes
    occurrence: int
    stored_size: int
    sha256: str  # lower-case hex of the stored bytes
    delivered_at: float
    #: lower-case hex of the stored header section, blank line included
    header_sha256: str | None = None
    #: octets received, counted as on the wire (line ends as two octets)
    wire_size: int | None = None
    #: see :class:`popsync.identity.HeaderDigest`
    stable_sha256: str | None = None
    mutable_octets: int | None = None
    mutable_lines: int | None = None
    #: the kind of target, and where it holds the copy (see deliver.base.Receipt)
    target: str = "maildir"
    receipt: str | None = None


@dataclass(frozen=True, slots=True)
class Skipped:
    """Left on the server by policy (e.g. larger than ``max_message_size``)."""

    uid: bytes
    occurrence: int
    server_size: int
    reason: str
    now: float


class _Prior(NamedTuple):
    id: int
    state: str
    maildir_name: str | None
    sha256: str | None


_T = TypeVar("_T")


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _show_key(key: Key) -> str:
    from popsync.errors import escape_server_text

    return f"UID {escape_server_text(key[0])} (copy {key[1]})"


def _unique_keys(account: str, keys: Iterable[Key]) -> list[Key]:
    out = list(keys)
    if len(set(out)) != len(out):
        raise LedgerError(f"account {account}: a ledger batch names the same message twice")
    return out


# The batched writes. Every value is an explicit bindparam (constants too), so
# a statement compiled once per dialect can be handed to the driver's
# executemany with plain tuples: SQLAlchemy's per-row parameter processing
# costs more than SQLite's own work at 100,000 rows. All values are
# driver-native (bytes, int, float, str, None), so no type processing is lost.
_INSERT: Final = insert(_messages).values(
    account=bindparam("b_account"),
    uid=bindparam("b_uid"),
    occurrence=bindparam("b_occ"),
    state=bindparam("b_state"),
    server_size=bindparam("b_size"),
    maildir_name=bindparam("b_name"),
    first_seen=bindparam("b_now"),
    last_seen=bindparam("b_now"),
    skip_reason=bindparam("b_reason"),
)
_REFETCH: Final = (
    update(_messages)
    .where(_m.id == bindparam("b_id"))
    .values(
        state=bindparam("b_state"),
        maildir_name=bindparam("b_name"),
        server_size=bindparam("b_size"),
        last_seen=bindparam("b_now"),
        skip_reason=bindparam("b_reason"),
    )
)
_DELIVER: Final = (
    update(_messages)
    .where(_m.id == bindparam("b_id"))
    .values(
        state=bindparam("b_state"),
        stored_size=bindparam("b_size"),
        sha256=bindparam("b_sha"),
        delivered_at=bindparam("b_at"),
        header_sha256=bindparam("b_hsha"),
        wire_size=bindparam("b_wire"),
        stable_sha256=bindparam("b_ssha"),
        mutable_octets=bindparam("b_mocts"),
        mutable_lines=bindparam("b_mlines"),
        target=bindparam("b_target"),
        receipt=bindparam("b_receipt"),
    )
)
_INTENT: Final = (
    update(_messages).where(_m.id == bindparam("b_id")).values(receipt=bindparam("b_receipt"))
)
# A row adopted from another tool's state file: delivered, with no local copy.
_ADOPT: Final = insert(_messages).values(
    account=bindparam("b_account"),
    uid=bindparam("b_uid"),
    occurrence=literal_column("0"),
    state=literal_column("'delivered'"),
    server_size=literal_column("0"),
    first_seen=bindparam("b_now"),
    last_seen=bindparam("b_now"),
    delivered_at=bindparam("b_now"),
    target=bindparam("b_target"),
    receipt=bindparam("b_receipt"),
)
# A delivered row fetched again: back to fetching under a fresh name, with
# everything recorded of the lost copy cleared (the new copy records its own).
_REOPEN: Final = (
    update(_messages)
    .where(_m.id == bindparam("b_id"))
    .values(
        state=literal_column("'fetching'"),
        maildir_name=bindparam("b_name"),
        last_seen=bindparam("b_now"),
        stored_size=null(),
        sha256=null(),
        delivered_at=null(),
        header_sha256=null(),
        wire_size=null(),
        stable_sha256=null(),
        mutable_octets=null(),
        mutable_lines=null(),
        attempts=literal_column("0"),
        withheld=null(),
        receipt=null(),
    )
)
_DELETE: Final = (
    update(_messages)
    .where(_m.id == bindparam("b_id"))
    .values(state=bindparam("b_state"), deleted_at=bindparam("b_at"))
)
_RESKIP: Final = (
    update(_messages)
    .where(_m.id == bindparam("b_id"))
    .values(
        state=bindparam("b_state"),
        server_size=bindparam("b_size"),
        last_seen=bindparam("b_now"),
        skip_reason=bindparam("b_reason"),
    )
)
_ATTEMPT: Final = (
    update(_messages)
    .where(_m.id == bindparam("b_id"))
    .values(attempts=_m.attempts + literal_column("1"), last_seen=bindparam("b_now"))
)
_WITHHOLD: Final = (
    update(_messages).where(_m.id == bindparam("b_id")).values(withheld=bindparam("b_reason"))
)
_RETIRE: Final = update(_messages).where(_m.id == bindparam("b_id")).values(uid=bindparam("b_uid"))
_REMAP: Final = (
    update(_messages)
    .where(_m.id == bindparam("b_id"))
    .values(
        uid=bindparam("b_uid"),
        occurrence=bindparam("b_occ"),
        previous_uid=bindparam("b_prev"),
        last_seen=bindparam("b_now"),
    )
)
_TOUCH: Final = (
    update(_messages).where(_m.id == bindparam("b_id")).values(last_seen=bindparam("b_now"))
)

# Existing rows among a batch: by UID in bounded chunks for small batches, by
# one scan of the account when the batch is large (a first sync).
_PRIOR_COLUMNS: Final = (_m.uid, _m.occurrence, _m.id, _m.state, _m.maildir_name, _m.sha256)
_PRIOR_BY_UID: Final = select(*_PRIOR_COLUMNS).where(
    _m.account == bindparam("account"), _m.uid.in_(bindparam("uids", expanding=True))
)
_PRIOR_ALL: Final = select(*_PRIOR_COLUMNS).where(_m.account == bindparam("account"))
_SCAN_ABOVE: Final = 5 * _IN_CHUNK


# The rows a poll compares every listed message with (see PollRow), and the
# whole rows of those still open.
# A slim row's state, whether it is named and whether it is stale, folded into
# one small integer by the database (see _SHAPES): the driver then builds one
# cached int per row instead of a fresh string and two booleans.
_STATE_CODES: Final = {state: i for i, state in enumerate(MESSAGE_STATES)}
_NAMED_BIT: Final = 1 << 2
_STALE_BIT: Final = 1 << 3


def _sql_int(value: int) -> Any:
    # Inline constants: _select_raw binds only the statement's named parameters.
    return literal_column(str(value))


_SHAPE: Final = (
    case(
        *(
            (_m.state == literal_column(f"'{state}'"), _sql_int(code))
            for state, code in _STATE_CODES.items()
        ),
        else_=_sql_int(0),
    )
    + case((_m.maildir_name.is_not(None), _sql_int(_NAMED_BIT)), else_=_sql_int(0))
    + case((_m.last_seen < bindparam("cutoff"), _sql_int(_STALE_BIT)), else_=_sql_int(0))
)
# Ordered by the unique constraint's index: SQLite then walks that index, and
# the table in the order its rows were mostly written, instead of the
# (account, maildir_name) index it picks otherwise, which jumps about the
# table once per row (about twice as slow for 50,000 rows).
_POLL_SLIM: Final = (
    select(_m.uid, _m.occurrence, _SHAPE, _m.delivered_at)
    .where(_m.account == bindparam("account"))
    .order_by(_m.uid, _m.occurrence)
)
_ROWS_BY_UID: Final = select(*_ROW_COLUMNS).where(
    _m.account == bindparam("account"), _m.uid.in_(bindparam("uids", expanding=True))
)


def _whole_rows(conn: Connection, account: str, wanted: set[Key]) -> dict[Key, LedgerRow]:
    """The whole rows of *account* among *wanted*, read by unique-id in bounded batches."""
    out: dict[Key, LedgerRow] = {}
    for chunk in _chunks(sorted({uid for uid, _ in wanted}), _IN_CHUNK):
        params = {"account": account, "uids": list(chunk)}
        for row in map(LedgerRow._make, conn.execute(_ROWS_BY_UID, params)):
            if row.key in wanted:
                out[row.key] = row
    return out


def _shapes() -> list[PollRow]:
    """The slim row, without a delivery time, for each code :data:`_SHAPE` can
    yield (the index): rows that differ in nothing else share one object."""
    shapes = [PollRow("fetching", None, False, False, None)] * (2 * _STALE_BIT)
    for state, code in _STATE_CODES.items():
        for named in (0, _NAMED_BIT):
            for stale in (0, _STALE_BIT):
                shapes[code + named + stale] = PollRow(state, None, bool(named), bool(stale), None)
    return shapes


_SHAPES: Final = _shapes()


# The account's generation (popsync.ledger.generations); a write of a watched
# account locks it first on PostgreSQL, so no other writer's bump slips in.
_g = message_generations.c
_GENERATION: Final = select(_g.epoch, _g.generation).where(_g.account == bindparam("account"))
_GENERATION_LOCKED: Final = _GENERATION.with_for_update()
_BUMP: Final = text(BUMP_POSTGRESQL)
_SAY_BUMPED: Final = text(f"SET LOCAL {BUMPED_SETTING} = 'on'")

#: A watched write that changes more rows than this makes the cache reload
#: instead (a first sync): re-reading them costs as much.
PATCH_LIMIT: Final = 2000


class Watcher(Protocol):
    """Told of every committed write of the account it watches (see
    :meth:`MessageStore.watching`); :mod:`popsync.ledger.rowcache` has one
    per account it keeps rows of."""

    def written(self, before: Generation, after: Generation, patch: Patch | None) -> None:
        """A write moved the account from *before* to *after*; *patch* holds
        every row it changed (None: it cannot say, the watcher must reload)."""


@dataclass(frozen=True, slots=True)
class Patch:
    """The rows one write transaction changed: the keys they had before, and
    the whole rows as committed (by their keys now)."""

    removed: frozenset[Key]
    rows: dict[Key, LedgerRow]


@dataclass(slots=True)
class _Writes:
    """What a write transaction of a watched account did, noted as it runs.

    Every batched write is one row per parameter set (by ``b_id``, or an
    insert naming ``b_uid`` and ``b_occ``, occurrence 0 if absent), and each
    changed row bumps the generation once: so ``count`` must equal the bumps
    seen at the end, or something wrote that was not noted and the cache
    must reload.  ``keys_of``: the key each row id had when the transaction
    read it (:meth:`MessageStore._prior`).
    """

    count: int = 0
    ids: set[int] = field(default_factory=set)
    inserted: set[Key] = field(default_factory=set)
    keys_of: dict[int, Key] = field(default_factory=dict)

    def note(self, params: list[dict[str, Any]]) -> None:
        for p in params:
            self.count += 1
            if "b_id" in p:
                self.ids.add(p["b_id"])
            else:
                self.inserted.add((p["b_uid"], p.get("b_occ", 0)))


class MessageStore(LedgerBase):
    """The ``messages`` table: one row per server message (occurrence) seen."""

    def rows(self, account: str) -> dict[Key, LedgerRow]:
        """Every message row of *account*, keyed by ``(uid, occurrence)``.

        Raises:
            LedgerError: the database cannot be read.
        """
        stmt = select(*_ROW_COLUMNS).where(_m.account == account)
        with self._transaction(f"read the messages of account {account}", write=False) as conn:
            result = conn.execute(stmt)
            # Positional construction: columns are selected in field order.
            make = LedgerRow._make
            return {(r[2], r[3]): make(r) for r in result}

    def generation(self, account: str) -> Generation:
        """The account's ``(epoch, generation)`` (:mod:`popsync.ledger.generations`):
        it changes with every write to the account's messages, by anyone.

        Raises:
            LedgerError: the database cannot be read.
        """
        with self._transaction(f"read the generation of account {account}", write=False) as conn:
            return self._generation(conn, account, lock=False)

    def poll_rows_at(
        self, account: str, now: float, *, delivery_times: bool = True
    ) -> tuple[dict[Key, PollRow], Generation]:
        """:meth:`poll_rows`, and the generation they are at.

        The generation is read first: on PostgreSQL each statement sees what
        was committed when it began, so a write committed between the two
        reads leaves an older generation with newer rows -- a cache holding
        them then reloads once more, never the other way round.

        Raises:
            LedgerError: the database cannot be read.
        """
        with self._transaction(f"read the messages of account {account}", write=False) as conn:
            generation = self._generation(conn, account, lock=False)
            return self._poll_rows(conn, account, now, delivery_times), generation

    @contextmanager
    def watching(self, account: str, watcher: Watcher) -> Iterator[None]:
        """Within the block, tell *watcher* of each write this thread makes to
        *account*'s messages, with the rows it changed (:class:`Watcher`)."""
        state = self._watches
        outer = getattr(state, "watch", None)
        state.watch = (account, watcher)
        try:
            yield
        finally:
            state.watch = outer

    def poll_rows(
        self, account: str, now: float, *, delivery_times: bool = True
    ) -> dict[Key, PollRow]:
        """Every message row of *account* as a slim :class:`PollRow`, keyed by
        ``(uid, occurrence)``: one query for all rows (a few narrow columns)
        and, if any row is open, the whole rows of those by key, in one read
        transaction.  ``stale`` is judged against *now*.

        Without *delivery_times* (for a policy that never deletes, which
        never asks when a message was delivered) every ``delivered_at`` is
        None, so the rows of settled messages are a handful of shared
        objects: about 150 bytes per known message, the key included, and
        about 250 with them, against ~1.3 KB for :meth:`rows`.

        Raises:
            LedgerError: the database cannot be read.
        """
        with self._transaction(f"read the messages of account {account}", write=False) as conn:
            return self._poll_rows(conn, account, now, delivery_times)

    def _poll_rows(
        self, conn: Connection, account: str, now: float, delivery_times: bool
    ) -> dict[Key, PollRow]:
        params = {"account": account, "cutoff": now - SEEN_REFRESH}
        shapes = _SHAPES
        make = PollRow._make
        rows = self._select_raw(conn, _POLL_SLIM, params)
        # The rows hold no reference cycles: the cyclic collector's
        # passes over a heap growing by 50,000 tuples are pure cost.
        collecting = gc.isenabled()
        gc.disable()
        try:
            if delivery_times:
                out = {}
                for uid, occ, code, at in rows:
                    shape = shapes[code]
                    out[uid, occ] = (
                        shape if at is None else make((shape[0], at, shape[2], shape[3], None))
                    )
            else:
                out = {(uid, occ): shapes[code] for uid, occ, code, _ in rows}
        finally:
            if collecting:
                gc.enable()
        # Open rows are found among the slim ones and read by key: a
        # query by state would read every row of the account again.
        opened = {key for key, row in out.items() if row.state in OPEN_STATES}
        for key, full in _whole_rows(conn, account, opened).items():
            out[key] = out[key]._replace(detail=full)
        return out

    def rows_by_key(self, account: str, keys: Iterable[Key]) -> dict[Key, LedgerRow]:
        """The whole rows of *account* among *keys* (missing keys are left
        out), read by unique-id in bounded batches.

        Raises:
            LedgerError: the database cannot be read.
        """
        wanted = set(keys)
        if not wanted:
            return {}
        with self._transaction(f"read the messages of account {account}", write=False) as conn:
            return _whole_rows(conn, account, wanted)

    def remap_rows(self, account: str, sizes: Iterable[int]) -> list[LedgerRow]:
        """The ``delivered`` rows of *account* with a stable header digest and
        one of these server sizes: the rows a renumbered message may be
        (:func:`popsync.plan.remap_candidates`), read in bounded batches.

        Raises:
            LedgerError: the database cannot be read.
        """
        wanted = sorted(set(sizes))
        if not wanted:
            return []
        stmt = select(*_ROW_COLUMNS).where(
            _m.account == account,
            _m.state == "delivered",
            _m.stable_sha256.is_not(None),
            _m.server_size.in_(bindparam("sizes", expanding=True)),
        )
        with self._transaction(f"read the messages of account {account}", write=False) as conn:
            return [
                LedgerRow._make(row)
                for chunk in _chunks(wanted, _IN_CHUNK)
                for row in conn.execute(stmt, {"sizes": list(chunk)})
            ]

    def counts(self, account: str) -> dict[str, int]:
        """Number of rows of *account* per state (every state present, 0 if
        none), and ``withheld``: delivered rows whose due deletion could not
        be confirmed (they stay on the server; see :meth:`mark_withheld`).

        Raises:
            LedgerError: the database cannot be read.
        """
        stmt = select(_m.state, func.count()).where(_m.account == account).group_by(_m.state)
        held = select(func.count()).where(
            _m.account == account, _m.state == "delivered", _m.withheld.is_not(None)
        )
        out: dict[str, int] = dict.fromkeys(MESSAGE_STATES, 0)
        with self._transaction(f"count the messages of account {account}", write=False) as conn:
            for state, n in conn.execute(stmt):
                out[str(state)] = int(n)
            out["withheld"] = int(conn.execute(held).scalar_one())
        return out

    def deletion_queue(self, account: str) -> tuple[int, float | None]:
        """The delivered messages of *account* a ``delete_after_days`` policy
        will delete later: how many, and the earliest ``delivered_at`` among
        them (None if none).  Counted as :func:`popsync.plan.plan` decides what
        is due: ``delivered`` rows with a copy (a name) and a delivery time;
        rows whose due deletion was withheld (see :meth:`counts`) are left out.

        Raises:
            LedgerError: the database cannot be read.
        """
        stmt = select(func.count(), func.min(_m.delivered_at)).where(
            _m.account == account,
            _m.state == "delivered",
            _m.maildir_name.is_not(None),
            _m.delivered_at.is_not(None),
            _m.withheld.is_(None),
        )
        with self._transaction(
            f"read the deletions due for account {account}", write=False
        ) as conn:
            count, earliest = conn.execute(stmt).one()
        return int(count), None if earliest is None else float(earliest)

    # -- watched writes (popsync.ledger.generations, "The poll's own writes") --

    def _generation(self, conn: Connection, account: str, *, lock: bool) -> Generation:
        stmt = _GENERATION_LOCKED if lock else _GENERATION
        row = conn.execute(stmt, {"account": account}).first()
        return None if row is None else (str(row[0]), int(row[1]))

    @contextmanager
    def _write(self, what: str, account: str) -> Iterator[Connection]:
        """A write transaction on *account*'s messages.

        It moves the account's generation on: on SQLite the triggers bump it
        per row; on PostgreSQL it is bumped here, once, and the trigger is
        told to skip this transaction (:mod:`popsync.ledger.generations`).
        If this thread watches the account (:meth:`watching`), its watcher
        hears of the write once it has committed, with the generations
        before and after and the rows it changed, all read inside it.
        """
        watch: tuple[str, Watcher] | None = getattr(self._watches, "watch", None)
        watched = watch is not None and watch[0] == account
        with self._transaction(what, write=True) as conn:
            before = self._generation(conn, account, lock=True) if watched else None
            if conn.dialect.name == "postgresql":
                conn.execute(_SAY_BUMPED)
                conn.execute(_BUMP, {"account": account})
            if not watched:
                yield conn
                return
            writes = self._watches.writes = _Writes()
            try:
                yield conn
            finally:
                self._watches.writes = None
            after = self._generation(conn, account, lock=False)
            patch = self._patch(conn, account, writes, before, after)
        assert watch is not None
        watch[1].written(before, after, patch)

    def _patch(
        self,
        conn: Connection,
        account: str,
        writes: _Writes,
        before: Generation,
        after: Generation,
    ) -> Patch | None:
        """The rows *writes* changed, re-read; None if they may not be all."""
        # SQLite: one bump per row changed; PostgreSQL: the one bump of _write.
        bumps = 1 if conn.dialect.name == "postgresql" else writes.count
        if before is None or after is None or before[0] != after[0]:
            return None  # the account's counter was created (or re-created)
        if after[1] - before[1] != bumps or writes.count > PATCH_LIMIT:
            return None
        if writes.count == 0:
            return Patch(frozenset(), {})
        removed = {writes.keys_of.get(row_id) for row_id in writes.ids}
        if None in removed:
            return None  # a row changed whose key before is not known
        rows: dict[Key, LedgerRow] = {}
        by_id = select(*_ROW_COLUMNS).where(_m.id.in_(bindparam("ids", expanding=True)))
        for ids in _chunks(sorted(writes.ids), _IN_CHUNK):
            for row in map(LedgerRow._make, conn.execute(by_id, {"ids": list(ids)})):
                rows[row.key] = row
        by_uid = select(*_ROW_COLUMNS).where(
            _m.account == account, _m.uid.in_(bindparam("uids", expanding=True))
        )
        for uids in _chunks(sorted({uid for uid, _ in writes.inserted}), _IN_CHUNK):
            for row in map(LedgerRow._make, conn.execute(by_uid, {"uids": list(uids)})):
                if row.key in writes.inserted:
                    rows[row.key] = row
        return Patch(frozenset(k for k in removed if k is not None), rows)

    def _executemany(
        self, conn: Connection, stmt: ClauseElement, params: list[dict[str, Any]]
    ) -> None:
        super()._executemany(conn, stmt, params)
        writes: _Writes | None = getattr(self._watches, "writes", None)
        if writes is not None:
            writes.note(params)

    def _noted(self, keys_of: dict[int, Key]) -> None:
        """Remember which key each row id had, for a watched write's patch."""
        writes: _Writes | None = getattr(self._watches, "writes", None)
        if writes is not None:
            writes.keys_of.update(keys_of)

    def _prior(self, conn: Connection, account: str, keys: Sequence[Key]) -> dict[Key, _Prior]:
        """The existing rows of *account* among *keys*."""
        wanted = set(keys)
        uids = sorted({uid for uid, _ in wanted})
        if len(uids) > _SCAN_ABOVE:
            results = [conn.execute(_PRIOR_ALL, {"account": account})]
        else:
            results = [
                conn.execute(_PRIOR_BY_UID, {"account": account, "uids": list(chunk)})
                for chunk in _chunks(uids, _IN_CHUNK)
            ]
        out: dict[Key, _Prior] = {}
        for result in results:
            for uid, occ, *rest in result:
                if (uid, occ) in wanted:
                    out[(uid, occ)] = _Prior(*rest)
        self._noted({prior.id: key for key, prior in out.items()})
        return out

    def begin_fetch(self, account: str, items: Sequence[FetchIntent]) -> None:
        """Record that these messages are about to be fetched into the named files.

        New rows are inserted as ``fetching``; a ``skipped`` row becomes
        ``fetching``; a ``fetching`` row (an earlier attempt that did not
        finish) stays so, its size and ``last_seen`` refreshed. A row that
        already has a Maildir name must be given that same name.

        Raises:
            LedgerError: a row is already delivered or deleted (fetching it
                again would make a duplicate), a different name is given for a
                row that has one, a name is taken by another message, or the
                database fails.
        """
        keys = _unique_keys(account, ((i.uid, i.occurrence) for i in items))
        if not keys:
            return
        with self._write(f"record fetches for account {account}", account) as conn:
            prior = self._prior(conn, account, keys)
            new: list[dict[str, Any]] = []
            again: list[dict[str, Any]] = []
            for item, key in zip(items, keys, strict=True):
                params = {
                    "b_state": "fetching",
                    "b_name": item.maildir_name,
                    "b_size": item.server_size,
                    "b_now": item.now,
                    "b_reason": None,
                }
                row = prior.get(key)
                if row is None:
                    params.update(b_account=account, b_uid=item.uid, b_occ=item.occurrence)
                    new.append(params)
                    continue
                if row.state not in ("fetching", "skipped"):
                    raise LedgerError(
                        f"account {account}: {_show_key(key)} is already {row.state}; "
                        "fetching it again would deliver a duplicate"
                    )
                if row.maildir_name is not None and row.maildir_name != item.maildir_name:
                    raise LedgerError(
                        f"account {account}: {_show_key(key)} was reserved as "
                        f"{row.maildir_name!r}, not {item.maildir_name!r}"
                    )
                params["b_id"] = row.id
                again.append(params)
            self._executemany(conn, _INSERT, new)
            self._executemany(conn, _REFETCH, again)

    def mark_delivered(self, account: str, items: Sequence[Delivered]) -> None:
        """Record that these messages are durable in the Maildir.

        Each row must be ``fetching`` (:meth:`begin_fetch` came first); a row
        already ``delivered`` with the same SHA-256 is left as it is (recovery
        may report a delivery twice).

        Raises:
            LedgerError: a row is missing or in another state, a digest is not
                64 lower-case hex digits, or the database fails.
        """
        keys = _unique_keys(account, ((i.uid, i.occurrence) for i in items))
        if not keys:
            return
        for item in items:
            for digest in (item.sha256, item.header_sha256, item.stable_sha256):
                if digest is not None and not _SHA256_HEX.fullmatch(digest):
                    raise LedgerError(f"account {account}: {digest!r} is not a SHA-256 hex digest")
        with self._write(f"record deliveries for account {account}", account) as conn:
            prior = self._prior(conn, account, keys)
            params: list[dict[str, Any]] = []
            for item, key in zip(items, keys, strict=True):
                row = prior.get(key)
                if row is not None and row.state == "fetching":
                    params.append(
                        {
                            "b_id": row.id,
                            "b_state": "delivered",
                            "b_size": item.stored_size,
                            "b_sha": item.sha256,
                            "b_at": item.delivered_at,
                            "b_hsha": item.header_sha256,
                            "b_wire": item.wire_size,
                            "b_ssha": item.stable_sha256,
                            "b_mocts": item.mutable_octets,
                            "b_mlines": item.mutable_lines,
                            "b_target": item.target,
                            "b_receipt": item.receipt,
                        }
                    )
                elif row is None or row.state != "delivered" or row.sha256 != item.sha256:
                    state = "no row" if row is None else f"state {row.state}"
                    raise LedgerError(
                        f"account {account}: cannot mark {_show_key(key)} delivered ({state}; "
                        "expected a fetching row)"
                    )
            self._executemany(conn, _DELIVER, params)

    def mark_deleted(self, account: str, keys: Sequence[Key], at: float) -> None:
        """Record that the server removed these messages (after ``+OK`` to QUIT).

        Each row must be ``delivered`` (I1: popsync DELEs only durable copies);
        a row already ``deleted`` keeps its first ``deleted_at``.

        Raises:
            LedgerError: a row is missing or was never delivered, or the
                database fails.
        """
        wanted = _unique_keys(account, keys)
        if not wanted:
            return
        with self._write(f"record deletions for account {account}", account) as conn:
            prior = self._prior(conn, account, wanted)
            params: list[dict[str, Any]] = []
            for key in wanted:
                row = prior.get(key)
                if row is not None and row.state == "delivered":
                    params.append({"b_id": row.id, "b_state": "deleted", "b_at": at})
                elif row is None or row.state != "deleted":
                    state = "no row" if row is None else f"state {row.state}"
                    raise LedgerError(
                        f"account {account}: cannot mark {_show_key(key)} deleted ({state}; "
                        "only delivered messages are ever deleted)"
                    )
            self._executemany(conn, _DELETE, params)

    def mark_skipped(self, account: str, items: Sequence[Skipped]) -> None:
        """Record messages left on the server by policy, with the reason.

        New rows are inserted as ``skipped``; ``fetching`` and ``skipped``
        rows become ``skipped`` (keeping any reserved Maildir name); delivered
        and deleted rows are left untouched: skipping never downgrades.

        Raises:
            LedgerError: the database fails.
        """
        keys = _unique_keys(account, ((i.uid, i.occurrence) for i in items))
        if not keys:
            return
        what = f"record skipped messages for account {account}"
        with self._write(what, account) as conn:
            prior = self._prior(conn, account, keys)
            new: list[dict[str, Any]] = []
            again: list[dict[str, Any]] = []
            for item, key in zip(items, keys, strict=True):
                params = {
                    "b_state": "skipped",
                    "b_size": item.server_size,
                    "b_now": item.now,
                    "b_reason": item.reason,
                }
                row = prior.get(key)
                if row is None:
                    params.update(
                        b_account=account, b_uid=item.uid, b_occ=item.occurrence, b_name=None
                    )
                    new.append(params)
                elif row.state in ("fetching", "skipped"):
                    params["b_id"] = row.id
                    again.append(params)
            self._executemany(conn, _INSERT, new)
            self._executemany(conn, _RESKIP, again)

    def record_intents(self, account: str, items: Sequence[tuple[Key, str]]) -> None:
        """Note, in ``fetching`` rows, what their target needs to recognise a
        copy after a crash (see :meth:`popsync.deliver.base.Target.intent`).

        Committed before the target's irreversible step; recovery reads it
        back as the row's ``receipt``.

        Raises:
            LedgerError: a row is missing or not ``fetching``, or the database fails.
        """
        keys = _unique_keys(account, (key for key, _ in items))
        if not keys:
            return
        with self._write(f"record delivery intents for account {account}", account) as conn:
            prior = self._prior(conn, account, keys)
            params: list[dict[str, Any]] = []
            for key, intent in items:
                row = prior.get(key)
                if row is None or row.state != "fetching":
                    state = "no row" if row is None else f"state {row.state}"
                    raise LedgerError(
                        f"account {account}: cannot note an intent for {_show_key(key)} ({state})"
                    )
                params.append({"b_id": row.id, "b_receipt": intent})
            self._executemany(conn, _INTENT, params)

    def record_attempts(self, account: str, keys: Sequence[Key], now: float) -> None:
        """Count one failed fetch of each of these ``fetching`` rows.

        :func:`popsync.plan.plan` fetches messages that failed before after
        all others, so one message that always fails cannot starve the rest.
        Keys without a ``fetching`` row are ignored.

        Raises:
            LedgerError: the database fails.
        """
        wanted = _unique_keys(account, keys)
        if not wanted:
            return
        with self._write(f"record failed fetches for account {account}", account) as conn:
            prior = self._prior(conn, account, wanted)
            params = [
                {"b_id": row.id, "b_now": now}
                for key in wanted
                if (row := prior.get(key)) is not None and row.state == "fetching"
            ]
            self._executemany(conn, _ATTEMPT, params)

    def mark_withheld(self, account: str, items: Sequence[tuple[Key, str | None]]) -> None:
        """Remember why a due DELE of each row was withheld (None: it no longer is).

        The poll reports a reason only when it differs from the one stored,
        so a message that cannot be confirmed is reported once, not on every
        poll.  Keys without a row are ignored.

        Raises:
            LedgerError: the database fails.
        """
        keys = _unique_keys(account, (key for key, _ in items))
        if not keys:
            return
        with self._write(f"record withheld deletions for account {account}", account) as conn:
            prior = self._prior(conn, account, keys)
            params = [
                {"b_id": row.id, "b_reason": reason}
                for key, reason in items
                if (row := prior.get(key)) is not None
            ]
            self._executemany(conn, _WITHHOLD, params)

    def retire(self, account: str, keys: Sequence[Key]) -> None:
        """Move these rows out of the way of a server that reused their unique-ids.

        The row is kept as history under the UID ``<uid> retired <row id>``: a
        space never occurs in a real unique-id (RFC 1939 §7), so the name can
        never be listed again, and the original UID stays readable.  The
        message now listed under the UID is then a new message to fetch.

        Raises:
            LedgerError: a row is missing, or the database fails.
        """
        wanted = _unique_keys(account, keys)
        if not wanted:
            return
        with self._write(f"retire reused unique-ids for account {account}", account) as conn:
            prior = self._prior(conn, account, wanted)
            params: list[dict[str, Any]] = []
            for key in wanted:
                row = prior.get(key)
                if row is None:
                    raise LedgerError(f"account {account}: cannot retire {_show_key(key)} (no row)")
                params.append({"b_id": row.id, "b_uid": key[0] + b" retired %d" % row.id})
            self._executemany(conn, _RETIRE, params)

    def remap(self, account: str, pairs: Sequence[tuple[Key, Key]], now: float) -> None:
        """Move ``delivered`` rows to the unique-ids a renumbering server gave them.

        Each pair is ``(old key, new key)``: the row keeps its id, state,
        digests and copy, and from now on answers to the new key, so the
        message is not fetched again; the old unique-id is kept as its
        ``previous_uid``.  All pairs in one transaction.

        Raises:
            LedgerError: an old row is missing or not ``delivered``, a key
                is named twice, a new key already has a row, or the database
                fails.
        """
        olds = _unique_keys(account, (old for old, _ in pairs))
        news = _unique_keys(account, (new for _, new in pairs))
        if not olds:
            return
        with self._write(f"record renumbered unique-ids for account {account}", account) as conn:
            prior = self._prior(conn, account, [*olds, *news])
            params: list[dict[str, Any]] = []
            for old, new in zip(olds, news, strict=True):
                row = prior.get(old)
                if row is None or row.state != "delivered":
                    state = "no row" if row is None else f"state {row.state}"
                    raise LedgerError(
                        f"account {account}: cannot move {_show_key(old)} to a new unique-id "
                        f"({state}; expected a delivered row)"
                    )
                if new in prior:
                    raise LedgerError(
                        f"account {account}: cannot move {_show_key(old)} to {_show_key(new)}, "
                        "which already has a row"
                    )
                params.append(
                    {
                        "b_id": row.id,
                        "b_uid": new[0],
                        "b_occ": new[1],
                        "b_prev": old[0],
                        "b_now": now,
                    }
                )
            self._executemany(conn, _REMAP, params)

    def reopen(self, account: str, items: Sequence[tuple[Key, str, str]], now: float) -> None:
        """Make these ``delivered`` rows ``fetching`` again, each under a fresh name.

        Each item is ``(key, old name, new name)``: the row must still be
        ``delivered`` under the old name (nothing moved it since the caller
        looked), and the new name must be free.  All rows in one transaction.
        The next fetch of the row delivers under the new name, so a damaged
        file left under the old one is never mistaken for the new copy, and a
        crash anywhere after this commit is recovered as any unfinished fetch
        is: the copy found under the new name is recorded, else fetched.

        Raises:
            LedgerError: a row is missing, not ``delivered``, or under another
                name; a new name is given twice or taken; or the database fails.
        """
        keys = _unique_keys(account, (key for key, _, _ in items))
        if not keys:
            return
        names = [new for _, _, new in items]
        if len(set(names)) != len(names):
            raise LedgerError(f"account {account}: a ledger batch gives one name twice")
        taken = select(_m.maildir_name).where(
            _m.account == account, _m.maildir_name.in_(bindparam("names", expanding=True))
        )
        with self._write(f"reopen messages to refetch for account {account}", account) as conn:
            if conn.execute(taken, {"names": names}).first() is not None:
                raise LedgerError(f"account {account}: a name chosen for a refetch is taken")
            prior = self._prior(conn, account, keys)
            params: list[dict[str, Any]] = []
            for key, old, new in items:
                row = prior.get(key)
                if row is None or row.state != "delivered" or row.maildir_name != old:
                    state = "no row" if row is None else f"state {row.state}"
                    raise LedgerError(
                        f"account {account}: cannot refetch {_show_key(key)} ({state}, "
                        f"name {row.maildir_name if row else None!r}; expected delivered {old!r})"
                    )
                params.append({"b_id": row.id, "b_name": new, "b_now": now})
            self._executemany(conn, _REOPEN, params)

    def adopt(
        self,
        account: str,
        uids: Sequence[bytes],
        *,
        target: str,
        receipt: str,
        now: float,
        dry_run: bool = False,
    ) -> list[bytes]:
        """Record these unique-ids as delivered by another tool (``popsync import``).

        Each becomes occurrence 0, state ``delivered`` at *now*, with no local
        copy (no name, no SHA-256, ``server_size`` 0: the other tool's state
        file records no size), the account's *target* kind and *receipt*
        (e.g. ``imported from fetchmail``) -- so it is never fetched, and
        :func:`popsync.identity.judge` can never confirm it for a DELE.  A
        unique-id whose occurrence 0 the ledger already holds, in any state,
        is left as it is.  One transaction: all or nothing.  With *dry_run*
        nothing is written.

        Returns the unique-ids adopted (or that would be), in the order given.

        Raises:
            LedgerError: *uids* names one twice, or the database fails.
        """
        keys = _unique_keys(account, ((uid, 0) for uid in uids))
        if not keys:
            return []
        what = f"adopt unique-ids for account {account}"
        txn = self._transaction(what, write=False) if dry_run else self._write(what, account)
        with txn as conn:
            prior = self._prior(conn, account, keys)
            fresh = [uid for uid, occ in keys if (uid, occ) not in prior]
            if not dry_run:
                params = [
                    {
                        "b_account": account,
                        "b_uid": uid,
                        "b_now": now,
                        "b_target": target,
                        "b_receipt": receipt,
                    }
                    for uid in fresh
                ]
                self._executemany(conn, _ADOPT, params)
            return fresh

    def touch_seen(self, account: str, keys: Iterable[Key], now: float) -> int:
        """Set ``last_seen = now`` on the listed rows last seen over a day ago.

        Rows seen within :data:`SEEN_REFRESH` are not rewritten, so a poll of a
        large mailbox with nothing new costs one scan and no writes. Keys with
        no row are ignored. Returns the number of rows updated.

        Raises:
            LedgerError: the database fails.
        """
        stale_stmt = select(_m.uid, _m.occurrence, _m.id).where(
            _m.account == account, _m.last_seen < now - SEEN_REFRESH
        )
        what = f"update last-seen times for account {account}"
        with self._write(what, account) as conn:
            stale = {(uid, occ): row_id for uid, occ, row_id in conn.execute(stale_stmt)}
            self._noted({row_id: key for key, row_id in stale.items()})
            params = [{"b_id": stale[k], "b_now": now} for k in set(keys) if k in stale]
            self._executemany(conn, _TOUCH, params)
            return len(params)
