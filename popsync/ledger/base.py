"""What every part of the ledger shares: the engine, transactions, batched writes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Self

from sqlalchemy import (
    URL,
    Connection,
    Engine,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
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

if TYPE_CHECKING:
    from popsync.ledger.locks import HeldLock


# Rows fetched from the driver at a time by LedgerBase._select_raw.
_RAW_BATCH = 4096


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


class LedgerBase:
    """One database connection pool and its transactions (see :mod:`popsync.ledger.store`).

    Create it with :meth:`open`; the constructor takes an engine that is
    already at the newest schema (as :meth:`open` leaves it).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._shown = describe_url(engine.url)
        self._closed = False
        # Batched write statements compiled for this engine's dialect.
        self._prepared: dict[ClauseElement, _Prepared] = {}
        # PostgreSQL only: where account locks get their own connections, and
        # the lock each thread's poll holds (its writes check it is still held).
        self._locks: Engine | None = None
        self._held = threading.local()
        # The account whose message writes this thread reports to a watcher
        # (popsync.ledger.messages.MessageStore.watching).
        self._watches = threading.local()

    # -- life cycle --------------------------------------------------------

    @classmethod
    def open(cls, url: str | URL) -> Self:
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
        if self._locks is not None:
            self._locks.dispose()

    def account_lock(
        self, state_dir: Path, account: str, *, wait: bool | float
    ) -> AbstractContextManager[None]:
        """The lock that keeps two popsync processes from polling *account* at once.

        On SQLite (one host) the ``flock`` of :func:`popsync.locks.account_lock`
        in *state_dir*; on PostgreSQL (workers on several hosts) a session
        advisory lock on a connection of its own
        (:func:`popsync.ledger.locks.advisory_account_lock`). Both are released
        when the block ends or the holder dies. *wait*: ``False`` fails at once
        if the lock is held, ``True`` waits as long as it takes, a number waits
        up to that many seconds.

        Raises (on entering the block):
            AccountBusy: the lock is held elsewhere.
            ConfigError: *account* is not a valid account name.
            PopsyncError: the lock file cannot be opened (SQLite), or
                LedgerError: the database cannot be reached (PostgreSQL).
        """
        if self._engine.dialect.name != "postgresql":
            from popsync.locks import account_lock

            return account_lock(state_dir, account, wait=wait)
        from popsync.ledger.locks import advisory_account_lock, lock_engine

        if self._closed:
            raise LedgerError(f"ledger {self._shown}: cannot lock {account}: the ledger is closed")
        if self._locks is None:
            self._locks = lock_engine(self._engine)
        return self._holding(advisory_account_lock(self._locks, account, wait=wait))

    @contextmanager
    def _holding(self, lock: AbstractContextManager[HeldLock]) -> Iterator[None]:
        """Hold *lock*, and note it for this thread's writes meanwhile."""
        with lock as held:
            outer = getattr(self._held, "lock", None)
            self._held.lock = held
            try:
                yield
            finally:
                self._held.lock = outer

    def _check_lock(self, conn: Connection) -> None:
        """Raise if this thread holds an account lock that the database no longer has."""
        held: HeldLock | None = getattr(self._held, "lock", None)
        if held is None:
            return
        from popsync.ledger.locks import lock_held

        if not lock_held(conn, held):
            err = LedgerError(
                f"account {held.account}: its lock in the ledger {self._shown} was lost (the "
                "connection holding it ended); this poll stops, another may take the account"
            )
            err.temporary = True
            raise err

    def __enter__(self) -> Self:
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
                if write:
                    self._check_lock(conn)
                yield conn

    def _select_raw(
        self, conn: Connection, stmt: ClauseElement, params: dict[str, Any]
    ) -> Iterator[tuple[Any, ...]]:
        """The rows of a plain SELECT (no expanding parameters) as the
        driver's own tuples, without SQLAlchemy's per-row result objects:
        for the few hot reads whose columns need no type processing (bytes,
        int, float, str and booleans come from both drivers as they are)."""
        prepared = self._prepared.get(stmt)
        if prepared is None:
            prepared = self._prepared[stmt] = _prepare(stmt, conn.dialect)
        sql, order = prepared
        # Driver errors are wrapped as SQLAlchemy's would be, so the caller's
        # transaction turns them into a LedgerError like any other.
        dbapi_error = conn.dialect.loaded_dbapi.Error
        cursor = conn.connection.cursor()
        try:
            if order is None:
                cursor.execute(sql, params)
            else:
                cursor.execute(sql, tuple(params[name] for name in order))
            while batch := cursor.fetchmany(_RAW_BATCH):
                yield from batch
        except dbapi_error as exc:
            raise DBAPIError.instance(sql, None, exc, dbapi_error) from exc
        finally:
            cursor.close()

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
