"""The slim rows a poll compares every listed message with, and the whole rows
it reads by key only where it needs them.

Tests that take ``ledger`` run on a SQLite file and on the private PostgreSQL
(``tests/postgres_fixtures.py``).
"""

from __future__ import annotations

import gc
import re
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event, text

from popsync.ledger import (
    SEEN_REFRESH,
    Delivered,
    FetchIntent,
    Key,
    Ledger,
    LedgerRow,
    PollRow,
    Skipped,
)
from popsync.plan import CUT_OFF, Policy, ServerMessage, plan
from popsync.sync import run_account
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import sample_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import load, write_config

SHA = "a" * 64
STABLE = "b" * 64
NOW = 1_000_000.0


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    led = Ledger.open(ledger_url)
    yield led
    led.close()


def intent(uid: bytes, *, size: int = 100, now: float = NOW) -> FetchIntent:
    return FetchIntent(uid, 0, size, f"name-{uid.decode()}", now)


def done(uid: bytes, *, stable: str | None = STABLE, at: float = NOW + 1) -> Delivered:
    return Delivered(
        uid, 0, 99, SHA, at, stable_sha256=stable, wire_size=101, mutable_octets=0, mutable_lines=0
    )


def test_poll_rows_agree_with_the_whole_rows(ledger: Ledger) -> None:
    old = NOW - 2 * SEEN_REFRESH
    ledger.begin_fetch(
        "acct", [intent(b"open"), intent(b"got"), intent(b"gone"), intent(b"stale", now=old)]
    )
    ledger.record_intents("acct", [((b"open", 0), "intent of open")])
    ledger.mark_delivered("acct", [done(b"got"), done(b"gone"), done(b"stale")])
    ledger.mark_deleted("acct", [(b"gone", 0)], at=NOW + 2)
    ledger.mark_skipped("acct", [Skipped(b"cut", 0, 500, f"{CUT_OFF} (500 bytes)", NOW)])
    ledger.adopt("acct", [b"adopted"], target="maildir", receipt="imported", now=NOW)
    ledger.begin_fetch("other", [intent(b"open")])

    whole = ledger.rows("acct")
    slim = ledger.poll_rows("acct", NOW)

    assert set(slim) == set(whole)
    for key, row in whole.items():
        assert slim[key].state == row.state, key
        assert slim[key].delivered_at == row.delivered_at, key
        assert bool(slim[key].named) == (row.maildir_name is not None), key
        assert bool(slim[key].stale) == (row.last_seen < NOW - SEEN_REFRESH), key
        # Whole rows only for what is still open.
        expect = row if row.state in ("fetching", "skipped") else None
        assert slim[key].detail == expect, key
    assert slim[(b"open", 0)].detail is not None
    assert slim[(b"open", 0)].detail.receipt == "intent of open"
    assert bool(slim[(b"stale", 0)].stale)
    assert not slim[(b"adopted", 0)].named


def test_the_plan_on_slim_rows_is_the_plan_on_whole_rows(ledger: Ledger) -> None:
    ledger.begin_fetch("acct", [intent(b"open", size=300), intent(b"due"), intent(b"fresh")])
    ledger.record_attempts("acct", [(b"open", 0)], NOW)
    ledger.mark_delivered("acct", [done(b"due", at=NOW - 3 * 86_400), done(b"fresh")])
    ledger.mark_skipped("acct", [Skipped(b"cut", 0, 500, f"{CUT_OFF} (500 bytes)", NOW)])
    ledger.adopt("acct", [b"adopted"], target="maildir", receipt="imported", now=NOW - 9e6)
    listing = [
        ServerMessage(i, uid, 0, size)
        for i, (uid, size) in enumerate(
            [(b"open", 300), (b"due", 99), (b"fresh", 99), (b"cut", 500), (b"new", 7)], 1
        )
    ]
    policy = Policy(delete_after_days=2, now=NOW + 10)

    by_whole = plan(listing, ledger.rows("acct"), policy)
    by_slim = plan(listing, ledger.poll_rows("acct", NOW), policy)

    def shape(p: object) -> object:
        assert hasattr(p, "fetch") and hasattr(p, "delete")
        return (
            [(f.message, f.existing_name, f.delete_after) for f in p.fetch],
            [d.key for d in p.delete],
        )

    assert shape(by_slim) == shape(by_whole)
    assert [d.key for d in by_slim.delete] == [(b"due", 0)]
    # The message that failed before comes last, under the name it was given.
    assert [(f.message.uid, f.existing_name) for f in by_slim.fetch] == [
        (b"new", None),
        (b"open", "name-open"),
    ]


def test_rows_by_key_reads_whole_rows_in_batches(ledger: Ledger) -> None:
    n = 1_200  # more unique-ids than one "IN (...)" batch
    ledger.begin_fetch("acct", [intent(b"%05d" % i) for i in range(n)])
    ledger.begin_fetch("other", [intent(b"00001")])
    wanted: list[Key] = [(b"%05d" % i, 0) for i in range(0, n, 1)] + [(b"nope", 0), (b"00001", 3)]

    got = ledger.rows_by_key("acct", wanted)

    assert set(got) == {(b"%05d" % i, 0) for i in range(n)}
    assert got[(b"00042", 0)] == ledger.rows("acct")[(b"00042", 0)]
    assert ledger.rows_by_key("acct", []) == {}


def test_remap_rows_are_the_delivered_rows_of_those_sizes(ledger: Ledger) -> None:
    sizes = {b"a": 100, b"b": 200, b"c": 100, b"open": 100, b"old": 100}
    ledger.begin_fetch("acct", [intent(uid, size=size) for uid, size in sizes.items()])
    ledger.mark_delivered("acct", [done(b"a"), done(b"b"), done(b"c"), done(b"old", stable=None)])
    # Past one batch of sizes, too.
    many = [100, *range(1_000, 1_700)]

    got = ledger.remap_rows("acct", many)

    assert sorted(row.uid for row in got) == [b"a", b"c"]
    assert all(isinstance(row, LedgerRow) for row in got)
    assert sorted(row.uid for row in ledger.remap_rows("acct", [200])) == [b"b"]
    assert ledger.remap_rows("acct", []) == []


def held_bytes(load: object) -> tuple[object, int]:
    """What *load()* returns, and the bytes it holds (traced allocations)."""
    assert callable(load)
    gc.collect()
    tracemalloc.start()
    try:
        result = load()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, held


@pytest.mark.parametrize("n", [10_000, pytest.param(50_000, marks=pytest.mark.slow)])
def test_slim_rows_fit_in_a_small_footprint(tmp_path: Path, n: int) -> None:
    """A nothing-new poll of a large mailbox holds a few hundred bytes per
    message, not the ~1.3 KB of the whole rows (about 250 measured)."""
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        uids = [b"%08X%08X" % (i, 1_700_000_000) for i in range(n)]
        ledger.begin_fetch("acct", [intent(uid) for uid in uids])
        ledger.mark_delivered("acct", [done(uid) for uid in uids])

        slim, slim_held = held_bytes(lambda: ledger.poll_rows("acct", NOW))
        keep, keep_held = held_bytes(lambda: ledger.poll_rows("acct", NOW, delivery_times=False))
        whole, whole_held = held_bytes(lambda: ledger.rows("acct"))
    finally:
        ledger.close()
    assert isinstance(slim, dict) and isinstance(keep, dict) and isinstance(whole, dict)
    assert len(slim) == len(keep) == len(whole) == n
    assert all(isinstance(row, PollRow) for row in slim.values())
    per_row = slim_held / n
    assert per_row < 400, f"{per_row:.0f} bytes per slim row"
    assert slim_held * 3 < whole_held, (slim_held, whole_held)
    # Without delivery times, settled rows share a few row objects.
    assert len({id(row) for row in keep.values()}) <= 4
    assert keep_held / n < 250, f"{keep_held / n:.0f} bytes per row without delivery times"


def test_without_delivery_times_rows_differ_only_in_delivered_at(ledger: Ledger) -> None:
    ledger.begin_fetch("acct", [intent(b"open"), intent(b"got"), intent(b"old", now=NOW - 9e6)])
    ledger.mark_delivered("acct", [done(b"got"), done(b"old")])
    ledger.adopt("acct", [b"adopted"], target="maildir", receipt="imported", now=NOW)

    full = ledger.poll_rows("acct", NOW)
    keep = ledger.poll_rows("acct", NOW, delivery_times=False)

    assert {key: row._replace(delivered_at=None) for key, row in full.items()} == keep
    assert full[(b"got", 0)].delivered_at == NOW + 1


@pytest.mark.parametrize("state", ["fetching", "skipped"])
def test_the_plan_refuses_an_open_row_without_its_detail(state: str) -> None:
    row = PollRow(state, None, True, False, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="without its detail"):
        plan([ServerMessage(1, b"a", 0, 10)], {(b"a", 0): row}, Policy(now=NOW))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("delete_after_days", [None, 30])
def test_a_poll_refreshes_only_rows_last_seen_over_a_day_ago(
    tmp_path: Path, ledger_url: str, delete_after_days: int | None
) -> None:
    store = MailStore(sample_messages()[:3])
    uids = store.uids()
    with POP3TestServer(store) as server:
        account = {"name": "acct", "port": server.port, "delete_after_days": delete_after_days}
        config = load(write_config(tmp_path, [account], ledger_url=ledger_url))
        with Ledger.open(config.ledger_url) as ledger:
            assert run_account(config.accounts[0], ledger, config.state_dir).ok
            old = time.time() - 2 * SEEN_REFRESH
            with ledger.engine.begin() as conn:
                conn.execute(
                    text("UPDATE messages SET last_seen = :old WHERE uid = :uid"),
                    {"old": old, "uid": uids[0]},
                )
            before = {key: row.last_seen for key, row in ledger.rows("acct").items()}
            start = time.time()

            report = run_account(config.accounts[0], ledger, config.state_dir)

            assert report.ok and report.counts.fetched == 0
            after = {key: row.last_seen for key, row in ledger.rows("acct").items()}
    assert after[(uids[0], 0)] >= start
    assert {k: v for k, v in after.items() if k[0] != uids[0]} == {
        k: v for k, v in before.items() if k[0] != uids[0]
    }


def test_the_slim_read_walks_the_unique_key_index(tmp_path: Path) -> None:
    """Left to itself SQLite reads the slim rows through the (account,
    maildir_name) index, fetching the table row by row in name order (hashed
    names: all over the table), about twice as slow for 50,000 rows as in
    unique-key order, in which a mailbox's rows were mostly written."""
    from popsync.ledger.messages import _POLL_SLIM

    ledger = Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        with ledger.engine.connect() as conn:
            compiled = _POLL_SLIM.compile(dialect=conn.dialect)
            params = tuple(
                {"account": "acct", "cutoff": NOW}[n] for n in compiled.positiontup or ()
            )
            steps = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled.string}", params).all()
            used = [m.group(1) for *_, detail in steps if (m := re.search(r"INDEX (\w+)", detail))]
            columns = [
                [info[2] for info in conn.exec_driver_sql(f"PRAGMA index_info({name})")]
                for name in used
            ]
    finally:
        ledger.close()
    assert columns == [["account", "uid", "occurrence"]], steps


def test_the_rows_are_read_once_when_none_is_open(tmp_path: Path) -> None:
    """The whole rows of open messages are read by key, and only if the slim
    read found one: no second pass over every row of the account."""
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}")
    statements: list[str] = []
    try:
        ledger.begin_fetch("acct", [intent(b"a"), intent(b"b")])
        ledger.mark_delivered("acct", [done(b"a"), done(b"b")])
        event.listen(
            ledger.engine, "connect", lambda conn, _: conn.set_trace_callback(statements.append)
        )
        ledger.engine.dispose()  # new connections, traced

        settled = ledger.poll_rows("acct", NOW)
        settled_reads = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
        ledger.begin_fetch("acct", [intent(b"c")])
        statements.clear()
        with_open = ledger.poll_rows("acct", NOW)
        open_reads = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    finally:
        ledger.close()
    assert len(settled) == 2 and len(settled_reads) == 1, settled_reads
    assert len(open_reads) == 2, open_reads
    detail = with_open[(b"c", 0)].detail
    assert detail is not None and detail.maildir_name == "name-c"
    assert with_open[(b"a", 0)].detail is None
