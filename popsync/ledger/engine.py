"""Opening the ledger database safely, and bringing its schema up to date.

Contract:

* :func:`create_ledger_engine` returns an :class:`~sqlalchemy.engine.Engine`
  whose every SQLite connection runs with ``journal_mode=WAL``,
  ``synchronous=FULL`` (in WAL mode, NORMAL survives a crash of popsync but may
  lose the last commits to a power loss; FULL syncs the WAL on every commit),
  ``foreign_keys=ON`` and
  ``busy_timeout=10000``. pysqlite's own transaction handling is switched off
  and popsync emits ``BEGIN`` itself, so a SELECT is inside its transaction
  (repeatable reads) and a connection given the execution option
  ``{WRITE_OPTION: True}`` starts with ``BEGIN IMMEDIATE``: it takes the write
  lock up front, waiting up to the busy timeout, instead of failing with
  SQLITE_BUSY when a read transaction later tries to become a write.
* :func:`prepare_sqlite_file` creates a missing ledger file with mode 0600 (its
  parent directory 0700) *without ever opening a descriptor on the database
  file itself*: on POSIX, closing any descriptor of a file drops every fcntl
  lock the process holds on it, which corrupts SQLite's locking if another
  connection in the process has it open (sqlite.org/howtocorrupt.html §2.2).
  SQLite gives the ``-wal`` and ``-shm`` files the mode of the database file.
  A ledger file (or ``-wal``, ``-shm``, ``-journal``) that is a symlink is
  refused: SQLite would follow it.
* :func:`upgrade` runs ``alembic upgrade head`` programmatically inside one
  transaction that excludes every other process's check or upgrade, so two
  processes opening a fresh ledger at once cannot both migrate it: on SQLite a
  ``BEGIN IMMEDIATE`` transaction, on PostgreSQL a transaction that first takes
  the advisory lock :data:`SCHEMA_LOCK_KEY` (:func:`lock_schema`). PostgreSQL's
  DDL is transactional, but two transactions creating the same table both get
  past ``CREATE TABLE`` and one then fails on a catalogue unique index
  (``pg_type_typname_nsp_index``): the lock makes the second wait, and see the
  first's committed schema. The Alembic environment ships inside the wheel
  as ``popsync.migrations``; no ``alembic.ini`` is needed. A database whose
  revision this popsync does not know (written by a newer popsync) is refused.

PostgreSQL (``postgresql+psycopg://...``, psycopg 3, the ``postgresql`` extra)
is the other backend the tests run on; it uses the same Core code (no
SQLite-only SQL outside the SQLite branches here). Other URLs may work but are
not tested. In-memory SQLite is
refused: a ledger that forgets what was fetched leads to duplicates, and a
missing ledger must never look like an empty one.

Every function raises :class:`~popsync.errors.LedgerError` (with a message
naming the database) and nothing else on a database or file-system failure.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    URL,
    Column,
    Connection,
    Engine,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    create_engine,
    event,
    inspect,
    make_url,
    select,
)
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

from popsync.errors import LedgerError

__all__ = [
    "BUSY_TIMEOUT_MS",
    "SCHEMA_LOCK_KEY",
    "SCHEMA_REVISION",
    "WRITE_OPTION",
    "advisory_key",
    "create_ledger_engine",
    "describe_url",
    "ledger_error",
    "lock_schema",
    "migrations_dir",
    "parse_url",
    "prepare_sqlite_file",
    "translate_errors",
    "upgrade",
]

#: The newest schema revision this popsync knows (the head of
#: ``migrations/versions``; a test keeps the two equal). Opening a ledger that
#: is already there skips importing Alembic, which keeps start-up fast.
SCHEMA_REVISION: Final = "0008"

#: How long a connection waits for another writer before giving up.
BUSY_TIMEOUT_MS: Final = 10_000

#: Execution option that makes the next transaction ``BEGIN IMMEDIATE``.
WRITE_OPTION: Final = "popsync_write"


def advisory_key(namespace: str, name: str) -> int:
    """A PostgreSQL advisory lock key (signed 64-bit) for *name* within *namespace*.

    The first 8 bytes of SHA-256 over ``popsync``, the namespace and the name
    (NUL-separated), as a big-endian signed integer: stable across processes,
    hosts and popsync versions, and 64 bits so that a million accounts are
    unlikely to share a key (about one chance in 36 million). The prefix keeps
    the keys apart from those of other programs using advisory locks in the
    same database.
    """
    digest = hashlib.sha256(b"\0".join(s.encode() for s in ("popsync", namespace, name)))
    return int.from_bytes(digest.digest()[:8], "big", signed=True)


#: The PostgreSQL advisory lock that serialises schema checks and upgrades
#: (``advisory_key("schema", "ledger")``; taken per transaction).
SCHEMA_LOCK_KEY: Final = advisory_key("schema", "ledger")

#: Files SQLite keeps beside the database, named by these suffixes.
_COMPANIONS: Final = ("-wal", "-shm", "-journal")

_VERSION_TABLE: Final = "alembic_version"
# As Alembic itself creates it, so a stamped fresh ledger and a migrated one match.
_version = Table(
    _VERSION_TABLE,
    MetaData(),
    Column("version_num", String(32), nullable=False),
    PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)


def describe_url(url: URL) -> str:
    """The database as shown in messages: the file for SQLite, else the URL sans password."""
    if url.get_backend_name() == "sqlite" and url.database:
        return url.database
    return url.render_as_string(hide_password=True)


#: SQLSTATE classes and codes of a database server that may well work a
#: moment later (PostgreSQL docs, Appendix A "Error Codes"): connection
#: exceptions, serialization failures and deadlocks, insufficient resources
#: (too many connections), lock not available, and the server shutting down,
#: starting up or restarting.
_TEMPORARY_SQLSTATES: Final = ("08", "40", "53", "55P03", "57P01", "57P02", "57P03")


def _is_temporary(exc: BaseException, orig: BaseException, detail: str) -> bool:
    if isinstance(exc, OperationalError | sqlite3.OperationalError) and (
        "locked" in detail or "busy" in detail
    ):
        return True  # SQLite: another writer held the lock past the busy timeout
    if getattr(exc, "connection_invalidated", False):
        return True  # the connection broke (SQLAlchemy saw a disconnect)
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith(_TEMPORARY_SQLSTATES)
    # psycopg raises OperationalError without a SQLSTATE when it cannot
    # connect at all (refused, timed out, name resolution).
    return type(orig).__module__.startswith("psycopg") and type(orig).__name__ == "OperationalError"


def ledger_error(shown: str, what: str, exc: BaseException) -> LedgerError:
    """Turn a database exception into a :class:`LedgerError` with one clear line.

    Marked temporary (retrying later may succeed): SQLite's "database is
    locked" (another writer held the lock past the busy timeout); a database
    server that cannot be reached, dropped the connection, is restarting or
    has no connection to spare, and serialization failures and deadlocks.
    """
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    detail = text.splitlines()[0] if text else type(orig).__name__
    err = LedgerError(f"ledger {shown}: cannot {what}: {detail}")
    err.temporary = _is_temporary(exc, orig, detail)
    return err


@contextmanager
def translate_errors(shown: str, what: str) -> Iterator[None]:
    """Re-raise database and file-system errors inside the block as :class:`LedgerError`."""
    try:
        yield
    except LedgerError:
        raise
    except (SQLAlchemyError, sqlite3.Error, OSError) as exc:
        raise ledger_error(shown, what, exc) from exc


def parse_url(url: str | URL) -> URL:
    """Parse a ledger URL; refuse in-memory SQLite.

    Raises:
        LedgerError: the URL is malformed or names an in-memory database.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise LedgerError(f"ledger URL {str(url)!r} is not a database URL: {exc}") from exc
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database or ""
        if db in ("", ":memory:") or parsed.query.get("mode") == "memory":
            raise LedgerError(
                f"ledger URL {describe_url(parsed)!r} names an in-memory database, which would "
                "forget what was fetched (and cause duplicates); name a file"
            )
    return parsed


def _is_uri_filename(url: URL) -> bool:
    return url.query.get("uri") in ("true", "1") or (url.database or "").startswith("file:")


def prepare_sqlite_file(url: URL) -> None:
    """Create the parent directory (0700) and an empty ledger file (0600) if missing.

    The file is created under a temporary name and ``link()``ed into place, so
    no descriptor is ever opened on the database path itself (howtocorrupt
    §2.2), and an existing ledger is never replaced. The mode does not depend
    on the umask beyond it removing bits, and SQLite gives the ``-wal`` and
    ``-shm`` files the database file's mode. URI filenames (``?uri=true``) are
    left to SQLite.

    Raises:
        LedgerError: the directory or the file cannot be created, or the
            ledger file (or its ``-wal``, ``-shm``, ``-journal``) is a symlink.
    """
    if url.get_backend_name() != "sqlite" or _is_uri_filename(url):
        return
    path = Path(url.database or "")
    with translate_errors(str(path), "create the ledger file"):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _refuse_symlinks(path)
        if os.path.lexists(path):
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.new")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        os.close(os.open(tmp, flags, 0o600))
        try:
            os.link(tmp, path)
        except FileExistsError:
            # Another process created it first: theirs is the ledger, unless
            # what appeared is a symlink.
            _refuse_symlinks(path)
        finally:
            tmp.unlink()


def _refuse_symlinks(path: Path) -> None:
    """Raise LedgerError if the ledger file or a companion of it is a symlink.

    SQLite follows symlinks: a link planted at the ledger's path (or at its
    ``-wal``, ``-shm`` or ``-journal``) would make popsync create or write a
    database wherever it points, with SQLite's default mode 0644 for a new
    file instead of 0600. Only the final component is checked; the directory
    is the user's choice.
    """
    for name in (path.name, *(path.name + suffix for suffix in _COMPANIONS)):
        candidate = path.with_name(name)
        if candidate.is_symlink():
            raise LedgerError(
                f"ledger {candidate} is a symbolic link; popsync does not follow one there "
                "(another user could point it at their file, or at one of yours): "
                "remove it, or name the real file in the config's 'ledger'"
            )


def _set_sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite must not emit BEGIN on its own: _begin below does, so that SELECTs
    # are transactional too and writers can ask for BEGIN IMMEDIATE.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Changing the journal mode needs the write lock, so the busy timeout
        # is set first: two processes opening a fresh ledger simply take turns.
        row = cur.execute("PRAGMA journal_mode = WAL").fetchone()
        if row is None or str(row[0]).lower() != "wal":
            # e.g. a file system without shared memory; WAL is not optional,
            # the durability reasoning (and concurrent readers) rely on it.
            raise LedgerError(f"SQLite refused journal_mode=WAL (got {row!r})")
        cur.execute("PRAGMA synchronous = FULL")
        cur.execute("PRAGMA foreign_keys = ON")
        if sys.platform == "darwin":
            # macOS fsync() does not flush the drive's cache; F_FULLFSYNC does.
            cur.execute("PRAGMA fullfsync = ON")
    finally:
        cur.close()


def _begin(conn: Connection) -> None:
    mode = "IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "DEFERRED"
    conn.exec_driver_sql(f"BEGIN {mode}")


def create_ledger_engine(url: str | URL) -> Engine:
    """An engine for the ledger at *url*, with popsync's connection settings.

    Nothing is connected yet; the pragmas are applied to every new connection.

    Raises:
        LedgerError: the URL is malformed or in-memory, or its driver is not installed.
    """
    parsed = parse_url(url)
    shown = describe_url(parsed)
    try:
        with translate_errors(shown, "create a database engine"):
            if parsed.get_backend_name() == "postgresql":
                # A pooled connection may have died while idle (a server
                # restart, a firewall's idle timeout): test it on checkout.
                return create_engine(parsed, pool_pre_ping=True)
            if parsed.get_backend_name() != "sqlite":
                return create_engine(parsed)
            engine = create_engine(parsed, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
    except ImportError as exc:
        raise LedgerError(
            f"ledger {shown}: the database driver is not installed ({exc.name or exc})"
        ) from exc
    event.listen(engine, "connect", _set_sqlite_pragmas)
    event.listen(engine, "begin", _begin)
    return engine


def migrations_dir() -> Path:
    """The directory of the Alembic environment shipped as ``popsync.migrations``.

    Raises:
        LedgerError: the package is missing or not on a real file system.
    """
    from importlib.resources import files

    # Running from a source checkout (PYTHONPATH=. or the repository as the
    # working directory): its migrations/ sits beside the popsync/ package and
    # belongs to this code, even if another copy of popsync is installed (an
    # editable install elsewhere would otherwise lend its older migrations).
    checkout = Path(__file__).resolve().parents[2] / "migrations"
    if (checkout / "env.py").is_file() and (checkout / "versions").is_dir():
        return checkout
    try:
        root = files("popsync.migrations")
    except ModuleNotFoundError as exc:
        raise LedgerError(f"popsync's schema migrations are not installed: {exc}") from exc
    if not isinstance(root, Path) or not (root / "env.py").is_file():
        raise LedgerError(
            f"popsync's schema migrations are not in a directory ({root}); Alembic needs "
            "them as plain files (is popsync installed from a zip?)"
        )
    return root


def _current_revisions(conn: Connection) -> set[str]:
    if not inspect(conn).has_table(_VERSION_TABLE):
        return set()
    return {str(v) for v in conn.scalars(select(_version.c.version_num))}


def _run_alembic(conn: Connection, current: set[str], shown: str) -> None:
    # Imported here: Alembic costs ~0.3 s to import, and only a first start or
    # an upgrade needs it.
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    cfg = Config()
    # ConfigParser interpolation: a literal % must be doubled.
    cfg.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    script = ScriptDirectory.from_config(cfg)
    known = {rev.revision for rev in script.walk_revisions()}
    unknown = sorted(current - known)
    if unknown:
        from popsync import __version__

        raise LedgerError(
            f"ledger {shown} has schema revision {', '.join(unknown)}, which popsync "
            f"{__version__} does not know (its newest is {script.get_current_head()}): it was "
            "written by a newer popsync; upgrade popsync or use another ledger"
        )
    # env.py runs the migrations on this connection, inside our transaction.
    cfg.attributes["connection"] = conn
    try:
        command.upgrade(cfg, "head")
    except CommandError as exc:
        raise LedgerError(f"ledger {shown}: cannot upgrade the schema: {exc}") from exc


def _create_fresh(conn: Connection) -> None:
    """An empty database: create the newest schema and stamp it, as
    ``alembic upgrade head`` would, without importing Alembic (~0.2 s on
    every first start).  The test that compares the migrations with
    :mod:`popsync.ledger.models` keeps the two paths equal.
    """
    from popsync.ledger.models import metadata

    metadata.create_all(conn)
    _version.create(conn)
    conn.execute(_version.insert().values(version_num=SCHEMA_REVISION))


def lock_schema(conn: Connection) -> None:
    """Inside a transaction on *conn*: wait for, then hold, the right to change the schema.

    On PostgreSQL, ``pg_advisory_xact_lock(SCHEMA_LOCK_KEY)``, released when
    the transaction ends (also when its connection dies). On SQLite nothing:
    the caller's ``BEGIN IMMEDIATE`` already holds the write lock.
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({int(SCHEMA_LOCK_KEY)})")


def _upgrade_engine(engine: Engine) -> None:
    shown = describe_url(engine.url)
    with translate_errors(shown, "check or upgrade the schema"), engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})
        with conn.begin():
            lock_schema(conn)
            current = _current_revisions(conn)
            if not current and not inspect(conn).get_table_names():
                _create_fresh(conn)
            elif current != {SCHEMA_REVISION}:
                _run_alembic(conn, current, shown)


def upgrade(target: Engine | str | URL) -> None:
    """Bring the ledger schema to the newest revision (``alembic upgrade head``).

    *target* is an engine (ideally from :func:`create_ledger_engine`) or a URL;
    for a URL a SQLite file is created first as :func:`prepare_sqlite_file`
    does. Idempotent, and safe when several processes call it at once.

    Raises:
        LedgerError: the database cannot be reached, the migration failed, or
            the database has a revision newer than this popsync knows.
    """
    if isinstance(target, Engine):
        _upgrade_engine(target)
        return
    parsed = parse_url(target)
    prepare_sqlite_file(parsed)
    engine = create_ledger_engine(parsed)
    try:
        _upgrade_engine(engine)
    finally:
        engine.dispose()
