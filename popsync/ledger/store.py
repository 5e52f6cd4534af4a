"""The ledger API: the durable record of what popsync fetched, delivered and deleted.

The ledger is the *primary* record (PROTOCOL-NOTES §2 "Idempotent delivery"):
the Maildir file check only covers a lost commit. The sync layer drives a
message through the states of :data:`~popsync.ledger.models.MessageState` in
the safe order of DESIGN §4, one batch per call:

    begin_fetch (commit) → RETR, fsync, link, fsync new/ → mark_delivered
    (commit) → DELE … QUIT +OK → mark_deleted (commit)

Contract of every method:

* **One transaction per call**, committed before the method returns; on any
  error nothing of the call is kept (a batch is applied whole or not at all).
  With ``synchronous=FULL`` a returned write survives a power loss.
* **Thread-safe**: one engine, a pooled connection per call. Writes on SQLite
  start with ``BEGIN IMMEDIATE`` and wait for other writers (busy timeout).
* **Never a downgrade**: a delivered or deleted row never goes back to
  ``fetching`` or ``skipped``; a row's Maildir name, once chosen, never
  changes (recovery looks for that exact file). Calls that would break this
  raise instead of writing.
* **Rows are kept** when their UID disappears from the server; nothing here
  deletes message rows.
* Only :class:`~popsync.errors.LedgerError` escapes (its message names the
  database and what failed; ``temporary`` is set when the database was busy).

Hot paths use SQLAlchemy Core with executemany; :meth:`Ledger.rows` loads
100,000 rows well under a second.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, cast

from sqlalchemy import (
    URL,
    Connection,
    Engine,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from popsync.errors import LedgerError
from popsync.ledger.engine import (
    WRITE_OPTION,
    create_ledger_engine,
    describe_url,
    parse_url,
    prepare_sqlite_file,
    translate_errors,
    upgrade,
)
from popsync.ledger.models import MESSAGE_STATES, MessageState, PollResult, messages, polls

__all__ = [
    "SEEN_REFRESH",
    "Delivered",
    "FetchIntent",
    "Ledger",
    "LedgerRow",
    "PollCounts",
    "PollRecord",
    "Skipped",
]

#: ``last_seen`` is refreshed at most this often (seconds), so a poll that
#: finds nothing new does not rewrite every row of a large mailbox.
SEEN_REFRESH: Final = 86_400.0

#: How long poll records are kept (seconds): 90 days.
POLL_HISTORY: Final = 90 * 86_400.0

#: Longest poll error text stored (it is already escaped by the caller).
MAX_ERROR_TEXT: Final = 2_000

# UIDs per "uid IN (...)" query: far below SQLite's bound-parameter limit.
_IN_CHUNK: Final = 500

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

_messages = messages
_polls = polls
_m = _messages.c
_p = _polls.c

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

    @property
    def key(self) -> Key:
        return (self.uid, self.occurrence)


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
    """The copy is durable in the Maildir (file and directory fsynced)."""

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


@dataclass(frozen=True, slots=True)
class Skipped:
    """Left on the server by policy (e.g. larger than ``max_message_size``)."""

    uid: bytes
    occurrence: int
    server_size: int
    reason: str
    now: float


@dataclass(frozen=True, slots=True)
class PollCounts:
    """What one poll saw and did."""

    listed: int = 0
    new: int = 0
    fetched: int = 0
    deleted: int = 0
    skipped: int = 0
    bytes: int = 0


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


class _Prior(NamedTuple):
    id: int
    state: str
    maildir_name: str | None
    sha256: str | None


def _chunks(items: Sequence[bytes], size: int) -> Iterator[Sequence[bytes]]:
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


class _Prepared(NamedTuple):
    sql: str
    #: Bind names in positional order, or None for a named paramstyle.
    order: tuple[str, ...] | None


def _prepare(stmt: ClauseElement, dialect: Dialect) -> _Prepared:
    compiled = stmt.compile(dialect=dialect)
    assert isinstance(compiled, SQLCompiler)
    if compiled.positional:
        return _Prepared(compiled.string, tuple(compiled.positiontup or ()))
    return _Prepared(compiled.string, None)


class Ledger:
    """The ledger of all accounts in one database. See the module docstring.

    Create it with :meth:`open`; the constructor takes an engine that is
    already at the newest schema (as :meth:`open` leaves it).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._shown = describe_url(engine.url)
        self._closed = False
        # Batched write statements compiled for this engine's dialect.
        self._prepared: dict[ClauseElement, _Prepared] = {}

    # -- life cycle --------------------------------------------------------

    @classmethod
    def open(cls, url: str | URL) -> Ledger:
        """Open (creating and migrating if needed) the ledger at *url*.

        A SQLite file's parent directory is created with mode 0700 and the
        file with mode 0600; the schema is upgraded to the newest revision.

        Raises:
            LedgerError: the database cannot be created, opened or migrated,
                or it was written by a newer popsync (unknown revision).
        """
        parsed = parse_url(url)
        prepare_sqlite_file(parsed)
        engine = create_ledger_engine(parsed)
        try:
            upgrade(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    @property
    def engine(self) -> Engine:
        """The underlying engine (for diagnostics and tests; do not dispose it)."""
        return self._engine

    def close(self) -> None:
        """Close every pooled connection. Later calls raise :class:`LedgerError`."""
        self._closed = True
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self, what: str, *, write: bool) -> Iterator[Connection]:
        if self._closed:
            raise LedgerError(f"ledger {self._shown}: cannot {what}: the ledger is closed")
        with translate_errors(self._shown, what), self._engine.connect() as conn:
            if write:
                conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                yield conn

    # -- messages ----------------------------------------------------------

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

    def counts(self, account: str) -> dict[str, int]:
        """Number of rows of *account* per state (every state present, 0 if none).

        Raises:
            LedgerError: the database cannot be read.
        """
        stmt = select(_m.state, func.count()).where(_m.account == account).group_by(_m.state)
        out: dict[str, int] = dict.fromkeys(MESSAGE_STATES, 0)
        with self._transaction(f"count the messages of account {account}", write=False) as conn:
            for state, n in conn.execute(stmt):
                out[str(state)] = int(n)
        return out

    def _executemany(
        self, conn: Connection, stmt: ClauseElement, params: list[dict[str, Any]]
    ) -> None:
        """Run *stmt* once per parameter set, through the driver's executemany."""
        if not params:
            return
        prepared = self._prepared.get(stmt)
        if prepared is None:
            prepared = self._prepared[stmt] = _prepare(stmt, conn.dialect)
        sql, order = prepared
        if order is None:
            conn.exec_driver_sql(sql, params)
        else:
            conn.exec_driver_sql(sql, [tuple(p[name] for name in order) for p in params])

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
        with self._transaction(f"record fetches for account {account}", write=True) as conn:
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
        with self._transaction(f"record deliveries for account {account}", write=True) as conn:
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
        with self._transaction(f"record deletions for account {account}", write=True) as conn:
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
        with self._transaction(what, write=True) as conn:
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
        with self._transaction(f"record failed fetches for account {account}", write=True) as conn:
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
        with self._transaction(
            f"record withheld deletions for account {account}", write=True
        ) as conn:
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
        with self._transaction(
            f"retire reused unique-ids for account {account}", write=True
        ) as conn:
            prior = self._prior(conn, account, wanted)
            params: list[dict[str, Any]] = []
            for key in wanted:
                row = prior.get(key)
                if row is None:
                    raise LedgerError(f"account {account}: cannot retire {_show_key(key)} (no row)")
                params.append({"b_id": row.id, "b_uid": key[0] + b" retired %d" % row.id})
            self._executemany(conn, _RETIRE, params)

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
        with self._transaction(what, write=True) as conn:
            stale = {(uid, occ): row_id for uid, occ, row_id in conn.execute(stale_stmt)}
            params = [{"b_id": stale[k], "b_now": now} for k in set(keys) if k in stale]
            self._executemany(conn, _TOUCH, params)
            return len(params)

    # -- polls -------------------------------------------------------------

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
                    ),
                    next_poll_at=r.next_poll_at,
                )
        return out
