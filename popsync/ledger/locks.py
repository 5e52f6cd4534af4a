"""Per-account locks on a PostgreSQL ledger: advisory locks that die with their holder.

Workers on several hosts share one PostgreSQL ledger, and a lock file on one
host's disk excludes nobody on another. So on PostgreSQL the account lock is a
*session* advisory lock (``pg_try_advisory_lock``, postgresql.org docs,
"Advisory Locks"):

* It is taken on a **dedicated connection** opened for the lock alone (not
  from the ledger's pool, so a poll never waits for its own lock's connection
  and the lock cannot leak to the pool's next user), in autocommit mode (an
  idle transaction held for a whole poll would hold back VACUUM). Closing the
  connection releases the lock.
* It **dies with its holder**: when the popsync process dies, even by SIGKILL,
  the kernel closes its socket, the server ends that session, and the lock is
  free. (A host that vanishes from the network is noticed by the server's TCP
  keepalive, ``tcp_keepalives_idle``.)
* The key is :func:`~popsync.ledger.engine.advisory_key` ``("account", name)``:
  64 bits of SHA-256, the same on every host.
* The holder is named through the lock connection's ``application_name``
  (``popsync PID@HOST``), so :class:`~popsync.locks.AccountBusy` says which
  process on which host polls the account, as the lock file's pid does on
  SQLite.
* Waiting for a bounded time polls ``pg_try_advisory_lock`` with a growing
  pause (capped at 0.1 s); ``wait=True`` blocks in ``pg_advisory_lock``.
* A lock can be lost while its holder lives: the server restarts, or ends or
  loses that one connection. The ledger then asks :func:`lock_held` at the
  start of each write of the poll (one query in the same transaction), and a
  poll whose lock is gone stops at its next write instead of going on beside
  the worker that took the account over.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final, NamedTuple

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.pool import NullPool

from popsync.config.values import account_name_problem
from popsync.errors import ConfigError
from popsync.ledger.engine import advisory_key, describe_url, translate_errors
from popsync.locks import AccountBusy

__all__ = ["HeldLock", "advisory_account_lock", "lock_engine", "lock_held"]

_POLL_FIRST: Final = 0.005
_POLL_MAX: Final = 0.1

#: ``application_name`` is cut by the server at 63 bytes.
_MAX_APP_NAME: Final = 63
_APP_NAME: Final = re.compile(r"popsync (\d+)@([A-Za-z0-9.-]+)\Z")

# The lock of one bigint key: the server shows its high and low 32 bits as
# classid and objid, with objsubid 1.
_HOLDER: Final = text(
    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.classid::bigint = :hi AND l.objid::bigint = :lo "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
_HELD_BY: Final = text(
    "SELECT count(*) FROM pg_locks l "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    "AND l.classid::bigint = :hi AND l.objid::bigint = :lo AND l.pid = :pid "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


class HeldLock(NamedTuple):
    """An account lock this process holds: the account, its key, the holding session."""

    account: str
    key: int
    #: ``pg_backend_pid()`` of the lock's connection.
    session: int


def _halves(key: int) -> dict[str, int]:
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return {"hi": unsigned >> 32, "lo": unsigned & 0xFFFF_FFFF}


def lock_held(conn: Connection, lock: HeldLock) -> bool:
    """Whether *lock*'s session still holds it, asked on *conn* (any connection)."""
    return bool(conn.execute(_HELD_BY, {**_halves(lock.key), "pid": lock.session}).scalar())


def _application_name() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "unknown"
    return f"popsync {os.getpid()}@{host}"[:_MAX_APP_NAME]


def lock_engine(engine: Engine) -> Engine:
    """An engine for lock connections to *engine*'s database: no pool, autocommit.

    Each ``connect()`` opens a new server session, named ``popsync PID@HOST``,
    and closing it ends the session (and so releases its advisory locks).
    """
    return create_engine(
        engine.url,
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
        connect_args={"application_name": _application_name()},
    )


def _try(conn: Connection, key: int) -> bool:
    return bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())


def _acquire(conn: Connection, key: int, wait: bool | float) -> bool:
    if wait is True:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        return True
    if _try(conn, key):
        return True
    deadline = time.monotonic() + (0.0 if wait is False else float(wait))
    pause = _POLL_FIRST
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(pause, left))
        if _try(conn, key):
            return True
        pause = min(pause * 2, _POLL_MAX)
    return False


def _backend_pid(conn: Connection) -> int:
    """The server process of *conn*'s session: known to libpq, so no round trip."""
    info = getattr(conn.connection.dbapi_connection, "info", None)
    pid = getattr(info, "backend_pid", None)
    if isinstance(pid, int):
        return pid
    return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _holder(conn: Connection, key: int) -> tuple[int | None, str | None]:
    """(pid, host) of the popsync session holding *key*, or Nones if not known."""
    name = conn.execute(_HOLDER, _halves(key)).scalar()
    match = _APP_NAME.match(str(name or ""))
    if match is None:
        return None, None
    return int(match[1]), match[2]


@contextmanager
def advisory_account_lock(locks: Engine, account: str, *, wait: bool | float) -> Iterator[HeldLock]:
    """Hold *account*'s advisory lock, on a new connection from *locks*, during the block.

    Yields the :class:`HeldLock`, for :func:`lock_held`.

    *locks* comes from :func:`lock_engine`. *wait* is as for
    :func:`popsync.locks.account_lock`.

    Raises:
        AccountBusy: another session holds the lock (after waiting, if asked to).
        ConfigError: *account* is not a valid account name.
        LedgerError: the database cannot be reached to take the lock.
    """
    problem = account_name_problem(account)
    if problem is not None:
        raise ConfigError(f"account name {account!r} cannot name a lock: it {problem}")
    key = advisory_key("account", account)
    shown = describe_url(locks.url)
    with translate_errors(shown, f"lock account {account}"):
        conn = locks.connect()
    try:
        with translate_errors(shown, f"lock account {account}"):
            acquired = _acquire(conn, key, wait)
            holder = None if acquired else _holder(conn, key)
            session = _backend_pid(conn)
        if holder is not None:
            raise AccountBusy(account, holder[0], host=holder[1])
        yield HeldLock(account, key, int(session))
    finally:
        # Ends the session, and with it the lock; an explicit unlock would
        # only add a round trip (and could fail on a dead connection).
        conn.close()
