"""The ledger against real databases: schema, settings, semantics, threads, speed.

Tests that take ``ledger`` or ``ledger_url`` run twice: on a SQLite file and on
an empty database of the private PostgreSQL the tests start
(``tests/postgres_fixtures.py``). Tests about the SQLite file itself (modes,
pragmas, symlinks, locking) take ``db_path`` and run on SQLite only.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, make_url, text
from sqlalchemy.exc import OperationalError

from popsync.errors import LedgerError
from popsync.ledger import (
    SCHEMA_REVISION,
    SEEN_REFRESH,
    Delivered,
    FetchIntent,
    Ledger,
    PollCounts,
    Skipped,
    create_ledger_engine,
    upgrade,
)
from popsync.ledger.engine import ledger_error, migrations_dir
from popsync.ledger.models import metadata
from tests.servers.postgres import PostgresCluster

REPO = Path(__file__).resolve().parents[1]
SHA_A = "a" * 64
SHA_B = "b" * 64


def url_for(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "popsync" / "ledger.db"


@pytest.fixture
def ledger(ledger_url: str):
    led = Ledger.open(ledger_url)
    yield led
    led.close()


@pytest.fixture
def sqlite_ledger(db_path: Path):
    led = Ledger.open(url_for(db_path))
    yield led
    led.close()


@pytest.fixture
def fresh_url(ledger_url: str, tmp_path: Path, request: pytest.FixtureRequest):
    """A second, empty ledger on the same backend as ``ledger_url``."""
    if make_url(ledger_url).get_backend_name() == "sqlite":
        yield url_for(tmp_path / "fresh" / "ledger.db")
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    name = cluster.new_database("fresh")
    yield cluster.url(name)
    cluster.drop_database(name)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def fetch(uid: bytes, name: str, *, occ: int = 0, size: int = 100, now: float = 1000.0):
    return FetchIntent(uid=uid, occurrence=occ, server_size=size, maildir_name=name, now=now)


def delivered(uid: bytes, *, occ: int = 0, size: int = 99, sha: str = SHA_A, at: float = 1001.0):
    return Delivered(uid=uid, occurrence=occ, stored_size=size, sha256=sha, delivered_at=at)


def raw_rows(path: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    """Read the file with the stdlib driver, independently of popsync's code."""
    con = sqlite3.connect(path)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def raw_sql(url: str, sql: str, **params: object) -> list[tuple[object, ...]]:
    """Run *sql* on a plain engine, without popsync's connection settings; commit."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(sql), params)
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


# -- schema and file -------------------------------------------------------


def test_open_creates_private_directory_file_and_schema(db_path: Path) -> None:
    led = Ledger.open(url_for(db_path))
    try:
        assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
        led.begin_fetch("acct", [fetch(b"1", "n1")])
        # SQLite gives the WAL the database file's mode.
        wal = db_path.with_name(db_path.name + "-wal")
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600
        # No temporary file left behind by the creation dance.
        assert sorted(p.name for p in db_path.parent.iterdir()) == [
            "ledger.db",
            "ledger.db-shm",
            "ledger.db-wal",
        ]
    finally:
        led.close()
    tables = {r[0] for r in raw_rows(db_path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"messages", "polls", "alembic_version"} <= tables
    assert raw_rows(db_path, "SELECT version_num FROM alembic_version") == [(SCHEMA_REVISION,)]


def test_pragmas_hold_on_every_connection(sqlite_ledger: Ledger) -> None:
    conns = [sqlite_ledger.engine.connect() for _ in range(3)]  # three distinct pooled connections
    try:
        for conn in conns:
            got = {
                p: conn.exec_driver_sql(f"PRAGMA {p}").scalar()
                for p in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
            assert got == {
                "journal_mode": "wal",
                "synchronous": 2,  # FULL
                "foreign_keys": 1,
                "busy_timeout": 10000,
            }
    finally:
        for conn in conns:
            conn.close()


def alembic_upgrade(url: str, revision: str) -> None:
    """``alembic upgrade REVISION`` as a developer would run it, through env.py."""
    from alembic import command

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, revision)


def described_schema(url: str) -> dict[str, object]:
    """Tables, columns, keys, indexes and checks as the database reports them."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            insp = inspect(conn)
            out: dict[str, object] = {}
            for table in sorted(insp.get_table_names()):
                columns = sorted(
                    (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                    for c in insp.get_columns(table)
                )
                out[table] = {
                    "columns": columns,
                    "pk": insp.get_pk_constraint(table)["constrained_columns"],
                    "unique": sorted(
                        (u["name"], tuple(u["column_names"]))
                        for u in insp.get_unique_constraints(table)
                    ),
                    "indexes": sorted(
                        (str(i["name"]), tuple(map(str, i["column_names"])), bool(i["unique"]))
                        for i in insp.get_indexes(table)
                    ),
                    "checks": sorted(
                        (str(c["name"]), " ".join(str(c["sqltext"]).split()))
                        for c in insp.get_check_constraints(table)
                    ),
                }
            return out
    finally:
        engine.dispose()


def test_migrations_match_models(ledger_url: str, fresh_url: str) -> None:
    """The migrations (run for real) and the models (a fresh ledger's fast path) agree."""
    alembic_upgrade(ledger_url, "head")
    Ledger.open(fresh_url).close()
    assert described_schema(ledger_url) == described_schema(fresh_url)
    version = "SELECT version_num FROM alembic_version"
    assert raw_sql(ledger_url, version) == raw_sql(fresh_url, version) == [(SCHEMA_REVISION,)]
    with Ledger.open(ledger_url) as ledger, ledger.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, metadata) == []
        uniques = {u["name"] for u in inspect(conn).get_unique_constraints("messages")}
    assert uniques == {"uq_messages_account_uid_occurrence", "uq_messages_account_maildir_name"}


def test_migrations_match_models_in_sqlite_text(db_path: Path) -> None:
    """On SQLite the schema is its CREATE text: that agrees too (modulo whitespace)."""
    alembic_upgrade(url_for(db_path), "head")
    migrated = sqlite3.connect(db_path)
    fresh_path = db_path.with_name("fresh.db")
    Ledger.open(url_for(fresh_path)).close()
    fresh = sqlite3.connect(fresh_path)
    schema = "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"

    def normalized(db: sqlite3.Connection) -> list[tuple[object, ...]]:
        # ALTER TABLE ADD COLUMN (a later migration) lays out whitespace differently.
        return [(*r[:3], " ".join(str(r[3]).split())) for r in db.execute(schema)]

    assert normalized(migrated) == normalized(fresh)
    for table in ("messages", "polls", "alembic_version"):
        columns = f"PRAGMA table_info({table})"
        assert migrated.execute(columns).fetchall() == fresh.execute(columns).fetchall()


def test_schema_revision_constant_is_the_script_head() -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    assert ScriptDirectory.from_config(cfg).get_heads() == [SCHEMA_REVISION]


@pytest.mark.parametrize("old", ["0001", "0003"])
def test_an_older_ledger_is_upgraded_in_place_keeping_its_rows(ledger_url: str, old: str) -> None:
    """An installed popsync upgrades the ledger an older release wrote."""
    alembic_upgrade(ledger_url, old)
    assert raw_sql(ledger_url, "SELECT version_num FROM alembic_version") == [(old,)]
    raw_sql(
        ledger_url,
        "INSERT INTO messages (account, uid, occurrence, state, server_size, maildir_name,"
        " first_seen, last_seen) VALUES ('acct', :uid, 0, 'fetching', 10, 'n-old', 1, 1)",
        uid=b"old",
    )
    with Ledger.open(ledger_url) as led:
        row = led.rows("acct")[(b"old", 0)]
        assert row.maildir_name == "n-old" and row.header_sha256 is None
        assert row.target == "maildir"
        led.mark_delivered("acct", [Delivered(b"old", 0, 9, SHA_A, 2.0, header_sha256=SHA_A)])
        assert led.rows("acct")[(b"old", 0)].header_sha256 == SHA_A
    version = "SELECT version_num FROM alembic_version"
    assert raw_sql(ledger_url, version) == [(SCHEMA_REVISION,)]


def test_open_is_idempotent_and_keeps_data(ledger_url: str) -> None:
    with Ledger.open(ledger_url) as first:
        first.begin_fetch("acct", [fetch(b"u1", "n1")])
        # A second ledger on the same database while the first is open.
        with Ledger.open(ledger_url) as second:
            assert set(second.rows("acct")) == {(b"u1", 0)}
    with Ledger.open(ledger_url) as again:
        assert again.rows("acct")[(b"u1", 0)].maildir_name == "n1"
    assert raw_sql(ledger_url, "SELECT count(*) FROM alembic_version") == [(1,)]


def test_upgrade_accepts_a_url_and_an_engine(ledger_url: str) -> None:
    upgrade(ledger_url)
    if is_sqlite(ledger_url):
        assert stat.S_IMODE(Path(make_url(ledger_url).database or "").stat().st_mode) == 0o600
    engine = create_ledger_engine(ledger_url)
    try:
        upgrade(engine)  # already at head: nothing to do
    finally:
        engine.dispose()
    version = "SELECT version_num FROM alembic_version"
    assert raw_sql(ledger_url, version) == [(SCHEMA_REVISION,)]


def test_database_from_a_newer_popsync_is_refused(ledger_url: str) -> None:
    Ledger.open(ledger_url).close()
    raw_sql(ledger_url, "UPDATE alembic_version SET version_num = '9999_from_the_future'")
    with pytest.raises(LedgerError, match=r"9999_from_the_future.*newer popsync"):
        Ledger.open(ledger_url)
    # Refused without touching it.
    version = "SELECT version_num FROM alembic_version"
    assert raw_sql(ledger_url, version) == [("9999_from_the_future",)]


def test_a_file_that_is_not_a_database_is_refused_untouched(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    garbage = b"this is not SQLite\n" * 200
    db_path.write_bytes(garbage)
    with pytest.raises(LedgerError, match=str(db_path)):
        Ledger.open(url_for(db_path))
    assert db_path.read_bytes() == garbage


def test_in_memory_ledger_is_refused() -> None:
    for url in ("sqlite://", "sqlite:///:memory:"):
        with pytest.raises(LedgerError, match="in-memory"):
            Ledger.open(url)


def test_unusable_location_is_a_ledger_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LedgerError, match="cannot create the ledger file"):
        Ledger.open(url_for(blocker / "sub" / "ledger.db"))


def test_directory_in_place_of_the_file_is_a_ledger_error(tmp_path: Path) -> None:
    (tmp_path / "ledger.db").mkdir()
    with pytest.raises(LedgerError, match=r"ledger\.db"):
        Ledger.open(url_for(tmp_path / "ledger.db"))


def test_malformed_url_is_a_ledger_error() -> None:
    with pytest.raises(LedgerError, match="not a database URL"):
        Ledger.open("not a url at all")


def test_missing_driver_is_a_ledger_error_without_the_password() -> None:
    with pytest.raises(LedgerError) as info:
        Ledger.open("mysql+nosuchdriver://alice:hunter2@db.example/popsync")
    assert "hunter2" not in str(info.value)
    assert "alice:***@db.example" in str(info.value)


def test_busy_database_errors_are_temporary() -> None:
    # Waiting out the real 10 s busy timeout would make a slow test; the
    # translation is what matters: "locked" means retry later.
    busy = OperationalError("BEGIN IMMEDIATE", {}, sqlite3.OperationalError("database is locked"))
    err = ledger_error("/x/ledger.db", "record fetches", busy)
    assert err.temporary is True
    assert str(err) == "ledger /x/ledger.db: cannot record fetches: database is locked"
    broken = OperationalError("SELECT", {}, sqlite3.OperationalError("disk I/O error"))
    assert ledger_error("/x/ledger.db", "read", broken).temporary is False


def test_an_unreachable_database_server_is_a_temporary_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens there now: the connection is refused.
    with pytest.raises(LedgerError) as info:
        Ledger.open(f"postgresql+psycopg://popsync:hunter2@127.0.0.1:{port}/popsync")
    assert info.value.temporary is True
    assert f"ledger postgresql+psycopg://popsync:***@127.0.0.1:{port}/popsync: cannot" in str(
        info.value
    )
    assert "hunter2" not in str(info.value)


def test_database_server_errors_worth_a_retry_are_temporary() -> None:
    class ServerError(Exception):
        def __init__(self, sqlstate: str) -> None:
            super().__init__(f"SQLSTATE {sqlstate}")
            self.sqlstate = sqlstate

    def temporary(sqlstate: str) -> bool:
        exc = OperationalError("SELECT", {}, ServerError(sqlstate))
        return ledger_error("db", "read", exc).temporary

    # serialization failure, deadlock, too many connections, admin shutdown,
    # cannot connect now, connection failure
    assert all(map(temporary, ["40001", "40P01", "53300", "57P01", "57P03", "08006"]))
    # unique violation, check violation, undefined table: retrying changes nothing
    assert not any(map(temporary, ["23505", "23514", "42P01"]))


def test_a_connection_the_server_dropped_is_replaced(
    postgres: PostgresCluster, postgres_url: str
) -> None:
    """A pooled connection that died while idle (say, the server restarted) is
    noticed on checkout and replaced: the next call succeeds."""
    with Ledger.open(postgres_url) as led:
        led.begin_fetch("acct", [fetch(b"u", "n")])
        database = make_url(postgres_url).database
        ended = postgres.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{database}' AND pid <> pg_backend_pid()"
        )
        assert ended and all(row == (True,) for row in ended)
        assert set(led.rows("acct")) == {(b"u", 0)}


def test_processes_creating_one_ledger_at_once(ledger_url: str) -> None:
    code = (
        "import sys; from popsync.ledger import Ledger; "
        "led = Ledger.open(sys.argv[1]); led.begin_fetch('p', []); led.close()"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, ledger_url],
            env=env,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    version = "SELECT version_num FROM alembic_version"
    assert raw_sql(ledger_url, version) == [(SCHEMA_REVISION,)]


def test_a_ledger_opened_while_another_creates_the_schema_waits_for_it(postgres_url: str) -> None:
    """PostgreSQL: a first start that finds another one creating the schema waits, then
    sees the schema (without the schema lock it would try to create it too, and fail
    on a duplicate key in the catalogue when the other commits)."""
    from popsync.ledger import engine as engine_module

    other = create_ledger_engine(postgres_url)
    done = threading.Event()
    failure: list[BaseException] = []

    def open_ledger() -> None:
        try:
            Ledger.open(postgres_url).close()
        except BaseException as exc:
            failure.append(exc)
        done.set()

    th = threading.Thread(target=open_ledger)
    try:
        with other.connect() as conn, conn.begin():
            # Another popsync's first start, caught before its COMMIT.
            engine_module.lock_schema(conn)
            engine_module._create_fresh(conn)
            th.start()
            assert not done.wait(0.5)  # waiting, not failed
        assert done.wait(30)
    finally:
        th.join(30)
        other.dispose()
    assert failure == []
    assert raw_sql(postgres_url, "SELECT version_num FROM alembic_version") == [(SCHEMA_REVISION,)]


def test_closed_ledger_refuses_calls(ledger: Ledger) -> None:
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        ledger.rows("acct")


# -- messages --------------------------------------------------------------


def test_begin_fetch_and_deliver_round_trip(ledger: Ledger) -> None:
    ledger.begin_fetch("acct", [fetch(b"u1", "n1", size=120, now=1000.0)])
    row = ledger.rows("acct")[(b"u1", 0)]
    assert (row.state, row.maildir_name, row.server_size) == ("fetching", "n1", 120)
    assert (row.first_seen, row.last_seen, row.stored_size, row.sha256) == (
        1000.0,
        1000.0,
        None,
        None,
    )

    ledger.mark_delivered("acct", [delivered(b"u1", size=117, sha=SHA_B, at=1005.5)])
    row = ledger.rows("acct")[(b"u1", 0)]
    assert (row.state, row.stored_size, row.sha256, row.delivered_at) == (
        "delivered",
        117,
        SHA_B,
        1005.5,
    )
    assert row.key == (b"u1", 0)
    assert row.account == "acct"

    ledger.mark_deleted("acct", [(b"u1", 0)], at=2000.0)
    row = ledger.rows("acct")[(b"u1", 0)]
    assert (row.state, row.deleted_at, row.maildir_name) == ("deleted", 2000.0, "n1")


def test_uids_are_opaque_bytes_and_occurrences_distinct(ledger: Ledger) -> None:
    uids = [b"abc", b"ABC", b"abc ", b"\x00\xff/..", b"x" * 200]
    ledger.begin_fetch("acct", [fetch(u, f"n{i}") for i, u in enumerate(uids)])
    ledger.begin_fetch("acct", [fetch(b"abc", "n-dup", occ=1)])
    rows = ledger.rows("acct")
    assert set(rows) == {(u, 0) for u in uids} | {(b"abc", 1)}
    assert rows[(b"ABC", 0)].maildir_name == "n1"
    assert rows[(b"abc", 1)].maildir_name == "n-dup"


def test_accounts_are_separate(ledger: Ledger) -> None:
    ledger.begin_fetch("one", [fetch(b"u", "same-name")])
    ledger.begin_fetch("two", [fetch(b"u", "same-name")])  # names are unique per account
    ledger.mark_delivered("one", [delivered(b"u")])
    assert ledger.rows("one")[(b"u", 0)].state == "delivered"
    assert ledger.rows("two")[(b"u", 0)].state == "fetching"
    assert ledger.rows("three") == {}


def test_skipped_becomes_fetching(ledger: Ledger) -> None:
    ledger.mark_skipped("acct", [Skipped(b"big", 0, 10**9, "max_message_size", 1000.0)])
    row = ledger.rows("acct")[(b"big", 0)]
    assert (row.state, row.skip_reason, row.maildir_name) == ("skipped", "max_message_size", None)
    ledger.begin_fetch("acct", [fetch(b"big", "n-big", size=500, now=3000.0)])
    row = ledger.rows("acct")[(b"big", 0)]
    assert (row.state, row.maildir_name, row.skip_reason) == ("fetching", "n-big", None)
    assert (row.server_size, row.first_seen, row.last_seen) == (500, 1000.0, 3000.0)


def test_fetching_row_keeps_its_name(ledger: Ledger) -> None:
    ledger.begin_fetch("acct", [fetch(b"u", "first", now=1000.0)])
    ledger.begin_fetch("acct", [fetch(b"u", "first", size=101, now=1100.0)])  # a retry
    row = ledger.rows("acct")[(b"u", 0)]
    assert (row.state, row.maildir_name, row.server_size, row.last_seen) == (
        "fetching",
        "first",
        101,
        1100.0,
    )
    with pytest.raises(LedgerError, match="reserved as 'first'"):
        ledger.begin_fetch("acct", [fetch(b"u", "second")])
    assert ledger.rows("acct")[(b"u", 0)].maildir_name == "first"


@pytest.mark.parametrize("final", ["delivered", "deleted"])
def test_delivered_and_deleted_are_never_downgraded(ledger: Ledger, final: str) -> None:
    ledger.begin_fetch("acct", [fetch(b"u", "n")])
    ledger.mark_delivered("acct", [delivered(b"u")])
    if final == "deleted":
        ledger.mark_deleted("acct", [(b"u", 0)], at=5.0)
    before = ledger.rows("acct")[(b"u", 0)]
    with pytest.raises(LedgerError, match=f"already {final}"):
        ledger.begin_fetch("acct", [fetch(b"u", "n")])
    ledger.mark_skipped("acct", [Skipped(b"u", 0, 5, "too big now", 9999.0)])  # silently kept
    assert ledger.rows("acct")[(b"u", 0)] == before


def test_fetching_can_be_skipped_and_keeps_name(ledger: Ledger) -> None:
    ledger.begin_fetch("acct", [fetch(b"u", "n")])
    ledger.mark_skipped("acct", [Skipped(b"u", 0, 100, "body overran LIST size", 2000.0)])
    row = ledger.rows("acct")[(b"u", 0)]
    assert (row.state, row.maildir_name, row.skip_reason) == (
        "skipped",
        "n",
        "body overran LIST size",
    )
    with pytest.raises(LedgerError, match="reserved as 'n'"):
        ledger.begin_fetch("acct", [fetch(b"u", "other")])
    ledger.begin_fetch("acct", [fetch(b"u", "n")])
    assert ledger.rows("acct")[(b"u", 0)].state == "fetching"


def test_a_batch_is_all_or_nothing(ledger: Ledger) -> None:
    ledger.begin_fetch("acct", [fetch(b"a", "na")])
    # "na" is taken by another UID: the UNIQUE constraint rejects the batch.
    with pytest.raises(LedgerError, match=r"(?i)unique"):
        ledger.begin_fetch("acct", [fetch(b"b", "nb"), fetch(b"c", "na")])
    assert set(ledger.rows("acct")) == {(b"a", 0)}

    ledger.begin_fetch("acct", [fetch(b"b", "nb")])
    with pytest.raises(LedgerError, match="no row"):
        ledger.mark_delivered("acct", [delivered(b"a"), delivered(b"b"), delivered(b"zzz")])
    assert {r.state for r in ledger.rows("acct").values()} == {"fetching"}

    with pytest.raises(LedgerError, match="twice"):
        ledger.begin_fetch("acct", [fetch(b"d", "nd"), fetch(b"d", "nd2")])
    assert (b"d", 0) not in ledger.rows("acct")


def test_mark_delivered_rules(ledger: Ledger) -> None:
    ledger.begin_fetch("acct", [fetch(b"u", "n")])
    with pytest.raises(LedgerError, match="SHA-256"):
        ledger.mark_delivered("acct", [delivered(b"u", sha="A" * 64)])
    ledger.mark_delivered("acct", [delivered(b"u", sha=SHA_A, at=10.0)])
    # Reported again (crash recovery) with the same digest: accepted, unchanged.
    ledger.mark_delivered("acct", [delivered(b"u", sha=SHA_A, at=20.0)])
    assert ledger.rows("acct")[(b"u", 0)].delivered_at == 10.0
    with pytest.raises(LedgerError, match="state delivered"):
        ledger.mark_delivered("acct", [delivered(b"u", sha=SHA_B)])
    ledger.mark_skipped("acct", [Skipped(b"s", 0, 1, "policy", 1.0)])
    with pytest.raises(LedgerError, match="state skipped"):
        ledger.mark_delivered("acct", [delivered(b"s")])


def test_mark_deleted_rules(ledger: Ledger) -> None:
    ledger.begin_fetch("acct", [fetch(b"f", "nf"), fetch(b"d", "nd")])
    ledger.mark_delivered("acct", [delivered(b"d")])
    with pytest.raises(LedgerError, match="state fetching"):
        ledger.mark_deleted("acct", [(b"d", 0), (b"f", 0)], at=50.0)
    assert ledger.rows("acct")[(b"d", 0)].state == "delivered"  # batch rolled back
    with pytest.raises(LedgerError, match="no row"):
        ledger.mark_deleted("acct", [(b"missing", 0)], at=50.0)
    ledger.mark_deleted("acct", [(b"d", 0)], at=50.0)
    ledger.mark_deleted("acct", [(b"d", 0)], at=60.0)  # idempotent
    assert ledger.rows("acct")[(b"d", 0)].deleted_at == 50.0


def test_rows_survive_when_the_server_forgets_them(ledger: Ledger) -> None:
    uids = [b"a", b"b", b"c"]
    ledger.begin_fetch("acct", [fetch(u, u.decode()) for u in uids])
    ledger.mark_delivered("acct", [delivered(u) for u in uids])
    before = ledger.rows("acct")
    # Later polls only list "a".
    ledger.touch_seen("acct", [(b"a", 0)], now=1000.0 + 2 * SEEN_REFRESH)
    ledger.begin_fetch("acct", [fetch(b"new", "new")])
    after = ledger.rows("acct")
    assert after[(b"b", 0)] == before[(b"b", 0)]
    assert after[(b"c", 0)] == before[(b"c", 0)]
    assert after[(b"a", 0)].last_seen == 1000.0 + 2 * SEEN_REFRESH


def test_touch_seen_rewrites_only_stale_rows(ledger: Ledger) -> None:
    ledger.begin_fetch("acct", [fetch(b"old", "o", now=0.0), fetch(b"recent", "r", now=50_000.0)])
    now = 90_000.0  # "old" last seen 25 h ago, "recent" 11 h ago
    n = ledger.touch_seen("acct", [(b"old", 0), (b"recent", 0), (b"unknown", 0)], now)
    rows = ledger.rows("acct")
    assert n == 1
    assert rows[(b"old", 0)].last_seen == now
    assert rows[(b"recent", 0)].last_seen == 50_000.0
    assert (b"unknown", 0) not in rows
    assert ledger.touch_seen("acct", [(b"old", 0), (b"recent", 0)], now + 1.0) == 0


def test_counts(ledger: Ledger) -> None:
    zero = {"fetching": 0, "delivered": 0, "deleted": 0, "skipped": 0, "withheld": 0}
    assert ledger.counts("acct") == zero
    ledger.begin_fetch("acct", [fetch(b"1", "1"), fetch(b"2", "2"), fetch(b"3", "3")])
    ledger.mark_delivered("acct", [delivered(b"1"), delivered(b"2")])
    ledger.mark_deleted("acct", [(b"1", 0)], at=1.0)
    ledger.mark_skipped("acct", [Skipped(b"4", 0, 9, "big", 1.0), Skipped(b"5", 0, 9, "big", 1.0)])
    ledger.begin_fetch("other", [fetch(b"1", "1")])
    ledger.mark_withheld("acct", [((b"2", 0), "cannot confirm"), ((b"1", 0), "no longer")])
    assert ledger.counts("acct") == {
        "fetching": 1, "delivered": 1, "deleted": 1, "skipped": 2, "withheld": 1
    }  # fmt: skip


def test_empty_batches_are_no_ops(ledger: Ledger) -> None:
    ledger.begin_fetch("acct", [])
    ledger.mark_delivered("acct", [])
    ledger.mark_deleted("acct", [], at=1.0)
    ledger.mark_skipped("acct", [])
    assert ledger.touch_seen("acct", [], now=1e9) == 0
    assert ledger.rows("acct") == {}


# -- polls -----------------------------------------------------------------


def test_polls_round_trip_and_latest_per_account(ledger: Ledger, ledger_url: str) -> None:
    assert ledger.last_polls() == {}
    p1 = ledger.start_poll("home", 100.0)
    ledger.finish_poll(
        p1,
        finished_at=101.0,
        result="error",
        error="server refused UIDL: -ERR [SYS/TEMP] busy",
        temporary=True,
        counts=PollCounts(listed=3),
        next_poll_at=160.0,
    )
    p2 = ledger.start_poll("home", 200.0)
    p3 = ledger.start_poll("work", 150.0)
    ledger.finish_poll(
        p3,
        finished_at=152.5,
        result="ok",
        error=None,
        temporary=None,
        counts=PollCounts(listed=10, new=4, fetched=3, deleted=2, skipped=1, bytes=5 * 2**31),
        next_poll_at=None,
    )
    assert len({p1, p2, p3}) == 3
    polls = ledger.last_polls()
    assert set(polls) == {"home", "work"}
    home, work = polls["home"], polls["work"]
    assert (home.id, home.result, home.finished_at, home.counts) == (
        p2,
        "running",
        None,
        PollCounts(),
    )
    assert (work.id, work.result, work.started_at, work.finished_at) == (p3, "ok", 150.0, 152.5)
    assert work.counts == PollCounts(10, 4, 3, 2, 1, 5 * 2**31)
    assert (work.error, work.temporary, work.next_poll_at) == (None, None, None)
    # The older "home" poll kept its outcome.
    got = raw_sql(
        ledger_url,
        "SELECT result, error, temporary, next_poll_at FROM polls WHERE id = :id",
        id=p1,
    )
    assert got == [("error", "server refused UIDL: -ERR [SYS/TEMP] busy", True, 160.0)]


def test_finish_poll_errors(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="no poll 4242"):
        ledger.finish_poll(
            4242,
            finished_at=1.0,
            result="ok",
            error=None,
            temporary=None,
            counts=PollCounts(),
            next_poll_at=None,
        )
    pid = ledger.start_poll("a", 1.0)
    with pytest.raises(LedgerError, match=r"(?i)check"):
        ledger.finish_poll(
            pid,
            finished_at=1.0,
            result="maybe",  # type: ignore[arg-type]
            error=None,
            temporary=None,
            counts=PollCounts(),
            next_poll_at=None,
        )
    ledger.finish_poll(
        pid,
        finished_at=2.0,
        result="error",
        error="x" * 100_000,
        temporary=False,
        counts=PollCounts(),
        next_poll_at=None,
    )
    error = ledger.last_polls()["a"].error
    assert error is not None and 100 < len(error) <= 2_000 and error.endswith("...")


# -- concurrency -----------------------------------------------------------


def test_threads_write_concurrently(ledger: Ledger) -> None:
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(40):
                uid = f"t{t}-{i}".encode()
                ledger.begin_fetch("acct", [fetch(uid, f"n-{t}-{i}")])
                ledger.mark_delivered("acct", [delivered(uid)])
                ledger.rows("acct")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []
    rows = ledger.rows("acct")
    assert len(rows) == 160
    assert {r.state for r in rows.values()} == {"delivered"}


def test_writer_waits_for_another_writer_instead_of_failing(
    sqlite_ledger: Ledger, db_path: Path
) -> None:
    ledger = sqlite_ledger
    # Another process-like writer holds the write lock with an uncommitted row.
    # With a deferred BEGIN the ledger would read a snapshot, then fail to
    # upgrade it to a write (SQLITE_BUSY_SNAPSHOT); BEGIN IMMEDIATE waits.
    other = sqlite3.connect(db_path, isolation_level=None, timeout=10)
    other.execute("BEGIN IMMEDIATE")
    other.execute(
        "INSERT INTO messages (account, uid, occurrence, state, server_size, maildir_name, "
        "first_seen, last_seen) VALUES ('acct', x'41', 0, 'fetching', 1, 'taken', 0, 0)"
    )
    done = threading.Event()
    failure: list[BaseException] = []

    def write() -> None:
        try:
            ledger.begin_fetch("acct", [fetch(b"A", "taken")])  # same key: must see the row
        except BaseException as exc:
            failure.append(exc)
        done.set()

    th = threading.Thread(target=write)
    th.start()
    assert not done.wait(0.5)  # blocked on the lock, not failed
    other.execute("COMMIT")
    other.close()
    assert done.wait(10)
    th.join()
    assert failure == []
    assert ledger.rows("acct")[(b"A", 0)].state == "fetching"


# -- speed -----------------------------------------------------------------


@pytest.mark.slow
def test_rows_loads_100k_quickly(ledger: Ledger) -> None:
    n = 100_000
    ledger.begin_fetch("big", [fetch(b"%d" % i, f"n{i}", size=i) for i in range(n)])
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        rows = ledger.rows("big")
        best = min(best, time.perf_counter() - start)
    assert len(rows) == n
    row = rows[(b"4711", 0)]
    assert (row.state, row.server_size, row.maildir_name) == ("fetching", 4711, "n4711")
    assert best < 3.0, f"rows() of 100k took {best:.2f}s"
    # A nothing-new poll touches nothing.
    start = time.perf_counter()
    assert ledger.touch_seen("big", rows.keys(), now=1000.0 + 60) == 0
    assert time.perf_counter() - start < 2.0


def test_poll_history_is_pruned_per_account(ledger: Ledger, ledger_url: str) -> None:
    day = 86_400.0
    old = ledger.start_poll("acct", 1_000.0)
    other = ledger.start_poll("other", 1_000.0)
    recent = ledger.start_poll("acct", 1_000.0 + 80 * day)
    newest = ledger.start_poll("acct", 1_000.0 + 91 * day)  # prunes acct's polls > 90 days old
    ids = {r[0] for r in raw_sql(ledger_url, "SELECT id FROM polls")}
    assert old not in ids
    assert {other, recent, newest} <= ids  # the other account's history is its own


def test_adopt_records_delivered_rows_without_a_copy_once(ledger: Ledger) -> None:
    ledger.begin_fetch("acct", [fetch(b"known", "n1")])

    def adopt(uids: list[bytes], *, dry_run: bool = False) -> list[bytes]:
        return ledger.adopt(
            "acct",
            uids,
            target="maildir",
            receipt="imported from mpop",
            now=5000.0,
            dry_run=dry_run,
        )

    assert adopt([b"a", b"known"], dry_run=True) == [b"a"]
    assert set(ledger.rows("acct")) == {(b"known", 0)}
    assert adopt([b"a", b"known", b"b"]) == [b"a", b"b"]
    rows = ledger.rows("acct")
    assert rows[(b"known", 0)].state == "fetching"
    adopted = rows[(b"a", 0)]
    assert (adopted.state, adopted.delivered_at, adopted.receipt) == (
        "delivered",
        5000.0,
        "imported from mpop",
    )
    assert (adopted.sha256, adopted.maildir_name, adopted.server_size) == (None, None, 0)
    assert adopt([b"a"]) == []
    with pytest.raises(LedgerError, match="names the same message twice"):
        adopt([b"c", b"c"])
    assert (b"c", 0) not in ledger.rows("acct")
