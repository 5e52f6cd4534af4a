"""The per-account message generation and the daemon's kept rows, on real ledgers.

Tests that take ``ledger_url`` run on a SQLite file and on the private
PostgreSQL of ``tests/postgres_fixtures.py``.  The generation must move with
*every* write to an account's messages, by popsync or anyone else, and kept
rows must always equal what :meth:`Ledger.poll_rows` reads, or not be used.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import make_url, text

from popsync.ledger import Delivered, FetchIntent, Ledger, Skipped
from popsync.ledger.messages import MessageStore
from popsync.ledger.rowcache import KnownRows
from tests.servers.postgres import PostgresCluster
from tests.test_ledger import alembic_upgrade, raw_sql

SHA = "c" * 64
NOW = 1000.0
#: Two days on: every row written at NOW is stale (last seen over a day ago).
LATER = NOW + 2 * 86_400.0


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


@pytest.fixture(autouse=True)
def keep_small_accounts(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests use accounts of a few messages: keep their rows too."""
    monkeypatch.setattr("popsync.ledger.rowcache.MIN_ROWS", 0)


@pytest.fixture
def ledger(ledger_url: str):
    led = Ledger.open(ledger_url)
    yield led
    led.close()


@pytest.fixture
def fresh_url(ledger_url: str, tmp_path: Path, request: pytest.FixtureRequest):
    """A second, empty ledger on the same backend as ``ledger_url``."""
    if is_sqlite(ledger_url):
        yield f"sqlite:///{tmp_path / 'fresh' / 'ledger.db'}"
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    name = cluster.new_database("fresh")
    yield cluster.url(name)
    cluster.drop_database(name)


def fetch(uid: bytes, *, name: str | None = None, now: float = NOW) -> FetchIntent:
    return FetchIntent(uid, 0, 100, name or "n-" + uid.decode(), now)


def deliver(uid: bytes) -> Delivered:
    return Delivered(uid, 0, 99, SHA, NOW + 1, header_sha256=SHA)


def seed(led: Ledger, account: str) -> None:
    """Rows in every state: d1, d2 delivered, f1 fetching, s1 skipped, x1 deleted."""
    led.begin_fetch(account, [fetch(u) for u in (b"d1", b"d2", b"f1", b"x1")])
    led.mark_delivered(account, [deliver(b"d1"), deliver(b"d2"), deliver(b"x1")])
    led.mark_deleted(account, [(b"x1", 0)], at=NOW + 2)
    led.mark_skipped(account, [Skipped(b"s1", 0, 10**9, "too big", NOW)])


# -- the generation ------------------------------------------------------------


def test_every_write_moves_the_generation_and_reads_do_not(ledger: Ledger, ledger_url: str) -> None:
    assert ledger.generation("a") is None  # no message yet: no counter
    ledger.begin_fetch("a", [fetch(b"u1")])
    seen = [ledger.generation("a")]
    assert seen[0] is not None

    def moved() -> bool:
        now = ledger.generation("a")
        fresh = now not in seen
        seen.append(now)
        return fresh

    ledger.rows("a")
    ledger.poll_rows("a", NOW)
    ledger.counts("a")
    assert not moved()
    ledger.mark_delivered("a", [deliver(b"u1")])
    assert moved()
    ledger.begin_fetch("b", [fetch(b"u1")])  # another account's write
    assert not moved()
    # Writers that are not popsync's Ledger: a plain connection, no settings.
    raw_sql(ledger_url, "UPDATE messages SET withheld = 'x' WHERE account = 'a'")
    assert moved()
    raw_sql(
        ledger_url,
        "INSERT INTO messages (account, uid, occurrence, state, server_size, first_seen,"
        " last_seen) VALUES ('a', :uid, 0, 'skipped', 1, 1, 1)",
        uid=b"raw",
    )
    assert moved()
    raw_sql(ledger_url, "DELETE FROM messages WHERE account = 'a' AND uid = :uid", uid=b"raw")
    assert moved()
    if not is_sqlite(ledger_url):
        raw_sql(ledger_url, "TRUNCATE messages")
        assert moved()
    # Strictly growing within one epoch.
    epochs = {g[0] for g in seen if g is not None}
    numbers = [g[1] for g in seen if g is not None]
    assert len(epochs) == 1 and numbers == sorted(numbers)


def test_a_re_created_counter_row_never_repeats_an_old_generation(
    ledger: Ledger, ledger_url: str
) -> None:
    ledger.begin_fetch("a", [fetch(b"u1")])
    old = ledger.generation("a")
    raw_sql(ledger_url, "DELETE FROM message_generations")
    assert ledger.generation("a") is None
    # Bump it back to the same number: the epoch still tells them apart.
    assert old is not None
    for _ in range(old[1]):
        ledger.record_attempts("a", [(b"u1", 0)], NOW)
    new = ledger.generation("a")
    assert new is not None and new[0] != old[0]


def test_migration_0008_gives_each_known_account_a_generation(ledger_url: str) -> None:
    alembic_upgrade(ledger_url, "0007")
    for account, uid in (("a", b"1"), ("a", b"2"), ("b", b"1")):
        raw_sql(
            ledger_url,
            "INSERT INTO messages (account, uid, occurrence, state, server_size, first_seen,"
            " last_seen) VALUES (:account, :uid, 0, 'skipped', 1, 1, 1)",
            account=account,
            uid=uid,
        )
    with Ledger.open(ledger_url) as led:
        a, b = led.generation("a"), led.generation("b")
        assert a is not None and b is not None
        assert a[1] == b[1] == 1 and a[0] != b[0]
        raw_sql(ledger_url, "UPDATE messages SET attempts = 1 WHERE account = 'b'")
        assert led.generation("b") == (b[0], 2)  # the migration's trigger
        led.mark_withheld("a", [((b"1", 0), "why")])
        assert led.generation("a") == (a[0], 2)


def triggers(url: str) -> list[tuple[object, ...]]:
    if is_sqlite(url):
        return raw_sql(url, "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY 1")
    return raw_sql(
        url,
        "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal "
        "UNION ALL SELECT proname, prosrc FROM pg_proc WHERE proname LIKE 'popsync%' ORDER BY 1",
    )


def test_a_migrated_and_a_fresh_ledger_have_the_same_triggers(
    ledger_url: str, fresh_url: str
) -> None:
    alembic_upgrade(ledger_url, "head")
    Ledger.open(fresh_url).close()
    migrated, fresh = triggers(ledger_url), triggers(fresh_url)
    assert migrated == fresh
    assert len(fresh) == 3  # SQLite: 3 triggers; PostgreSQL: 2 and their function


# -- kept rows -------------------------------------------------------------------

#: One write of each kind, on an account seeded by :func:`seed`.
WRITES: dict[str, Callable[[Ledger, str], object]] = {
    "begin_fetch": lambda led, a: led.begin_fetch(
        a, [fetch(b"new"), FetchIntent(b"s1", 0, 10, "n-s1", NOW)]
    ),
    "mark_delivered": lambda led, a: led.mark_delivered(a, [deliver(b"f1")]),
    "mark_deleted": lambda led, a: led.mark_deleted(a, [(b"d1", 0)], at=NOW + 5),
    "mark_skipped": lambda led, a: led.mark_skipped(
        a, [Skipped(b"f1", 0, 5, "cut off", NOW), Skipped(b"new", 0, 5, "big", NOW)]
    ),
    "record_intents": lambda led, a: led.record_intents(a, [((b"f1", 0), "intent")]),
    "record_attempts": lambda led, a: led.record_attempts(a, [(b"f1", 0)], NOW),
    "mark_withheld": lambda led, a: led.mark_withheld(a, [((b"d1", 0), "not confirmed")]),
    "retire": lambda led, a: led.retire(a, [(b"d1", 0)]),
    "remap": lambda led, a: led.remap(a, [((b"d1", 0), (b"d1-new", 0))], NOW),
    "reopen": lambda led, a: led.reopen(a, [((b"d2", 0), "n-d2", "n-d2-again")], NOW),
    "adopt": lambda led, a: led.adopt(a, [b"imp", b"d1"], target="maildir", receipt="r", now=NOW),
    "touch_seen": lambda led, a: led.touch_seen(a, [(b"d1", 0), (b"f1", 0)], LATER),
}


def test_every_ledger_writer_is_covered() -> None:
    """The next test must try every MessageStore method that writes messages."""
    writers = {
        name
        for name, fn in inspect.getmembers(MessageStore, inspect.isfunction)
        if not name.startswith("_") and "self._write(" in inspect.getsource(fn)
    }
    assert writers == set(WRITES)


@pytest.mark.parametrize("delivery_times", [True, False])
def test_the_ledgers_own_writes_keep_the_kept_rows_current(
    ledger: Ledger, delivery_times: bool
) -> None:
    known = KnownRows()
    for name, write in WRITES.items():
        seed(ledger, name)
        known.rows(ledger, name, LATER, delivery_times=delivery_times)
        with known.watching(ledger, name):
            write(ledger, name)
        reads = known.reads
        kept = known.rows(ledger, name, LATER, delivery_times=delivery_times)
        assert known.reads == reads, f"{name}: the rows were read again, not kept current"
        assert kept == ledger.poll_rows(name, LATER, delivery_times=delivery_times), name


def test_a_write_by_another_process_is_seen_at_the_next_poll(ledger_url: str) -> None:
    """Two Ledgers on one database stand for the daemon and, say, ``popsync sync``."""
    known = KnownRows()
    with Ledger.open(ledger_url) as daemon, Ledger.open(ledger_url) as other:
        seed(daemon, "a")
        first = known.rows(daemon, "a", NOW, delivery_times=True)
        assert known.rows(daemon, "a", NOW, delivery_times=True) is first  # kept
        other.begin_fetch("a", [fetch(b"theirs")])
        other.mark_delivered("a", [deliver(b"theirs")])
        got = known.rows(daemon, "a", NOW, delivery_times=True)
        assert got[(b"theirs", 0)].state == "delivered"
        assert got == daemon.poll_rows("a", NOW)
        # Another write between the poll's read and its own write: the
        # daemon's write cannot patch rows it did not see; they are read again.
        other.mark_deleted("a", [(b"theirs", 0)], at=NOW)
        with known.watching(daemon, "a"):
            daemon.record_attempts("a", [(b"f1", 0)], NOW)
        reads = known.reads
        assert known.rows(daemon, "a", NOW, delivery_times=True) == daemon.poll_rows("a", NOW)
        assert known.reads == reads + 1


def test_a_write_the_ledger_did_not_note_makes_the_kept_rows_reload(tmp_path: Path) -> None:
    """SQLite counts a bump per changed row: a write inside a watched
    transaction that bypassed the Ledger's bookkeeping does not go unseen."""
    known = KnownRows()
    with Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}") as led:
        seed(led, "a")
        known.rows(led, "a", NOW, delivery_times=True)
        with known.watching(led, "a"), led._write("sneak", "a") as conn:
            conn.execute(text("UPDATE messages SET state = 'delivered' WHERE uid = x'6631'"))
        reads = known.reads
        rows = known.rows(led, "a", NOW, delivery_times=True)
        assert known.reads == reads + 1
        assert rows[(b"f1", 0)].state == "delivered"


def test_kept_rows_are_read_again_after_max_age_and_when_the_policy_changes(
    ledger: Ledger,
) -> None:
    from popsync.ledger.rowcache import MAX_AGE

    known = KnownRows()
    seed(ledger, "a")
    known.rows(ledger, "a", NOW, delivery_times=True)
    known.rows(ledger, "a", NOW + MAX_AGE - 1, delivery_times=True)
    assert known.reads == 1
    known.rows(ledger, "a", NOW + MAX_AGE, delivery_times=True)
    assert known.reads == 2
    rows = known.rows(ledger, "a", NOW + MAX_AGE, delivery_times=False)
    assert known.reads == 3 and rows[(b"d1", 0)].delivered_at is None
    known.forget(["a"])
    assert known.accounts() == set()


def test_an_account_without_messages_is_not_kept(ledger: Ledger) -> None:
    known = KnownRows()
    assert known.rows(ledger, "empty", NOW, delivery_times=True) == {}
    assert known.accounts() == set()


def test_accounts_below_min_rows_are_read_every_poll(ledger: Ledger) -> None:
    known = KnownRows(min_rows=1000)
    seed(ledger, "a")
    known.rows(ledger, "a", NOW, delivery_times=True)
    known.rows(ledger, "a", NOW, delivery_times=True)
    assert known.reads == 2 and known.hits == 0
    assert known.accounts() == set()


def test_past_max_rows_the_least_recently_polled_rows_are_dropped(ledger: Ledger) -> None:
    for name in ("a", "b", "c"):
        seed(ledger, name)
    per_account = len(ledger.poll_rows("a", NOW))
    known = KnownRows(min_rows=0, max_rows=2 * per_account)
    known.rows(ledger, "a", NOW, delivery_times=True)
    known.rows(ledger, "b", NOW, delivery_times=True)
    known.rows(ledger, "a", NOW, delivery_times=True)  # a is now the more recent
    known.rows(ledger, "c", NOW, delivery_times=True)
    assert known.accounts() == {"a", "c"}
    # An account larger than the whole budget is never kept.
    small = KnownRows(min_rows=0, max_rows=per_account - 1)
    small.rows(ledger, "a", NOW, delivery_times=True)
    assert small.accounts() == set()
