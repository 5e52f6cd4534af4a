"""The daemon keeps each account's ledger rows between polls: never out of date.

An in-process daemon (``tests.test_daemon.Harness``) on the project's POP3
test server, with real ``popsync sync`` and ``popsync import`` processes
writing the same ledger between its polls, on SQLite and on PostgreSQL.  A
poll that used rows older than the ledger would fetch a message again --
which the ledger refuses ("already delivered"), so the poll fails -- or miss
one; every test checks each message is stored exactly once and every poll
succeeded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from popsync.daemon import Backoff, PollEvent
from popsync.testing.faults import Faults
from popsync.testing.mailstore import MailStore
from popsync.testing.server import POP3TestServer
from tests.helpers import popsync, run_sync, wait_until, write_config
from tests.test_daemon import (
    SECRET,
    Harness,
    RetrLog,
    account,
    assert_exactly_once,
    messages,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(autouse=True)
def keep_small_accounts(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests use accounts of a few messages: keep their rows too."""
    monkeypatch.setattr("popsync.ledger.rowcache.MIN_ROWS", 0)


@pytest.fixture
def server() -> Iterator[Callable[..., POP3TestServer]]:
    started: list[POP3TestServer] = []

    def start(msgs: list[bytes], **kw: Any) -> POP3TestServer:
        srv = POP3TestServer(MailStore(msgs), password=SECRET, **kw).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def daemons() -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(config_path: Path, **kw: Any) -> Harness:
        h = Harness(config_path, **kw)
        made.append(h)
        return h.start()

    yield make
    for h in made:
        if h.thread.is_alive():
            h.stop()


def poll_now(h: Harness, name: str) -> PollEvent:
    """Ask for a poll of every account and wait for *name*'s."""
    n = len(h.polls(name))
    h.daemon.request_poll_now()
    event = h.wait_polls(name, n + 1, timeout=30)[n]
    assert event.report.ok, event.report.error
    return event


def test_the_daemon_sees_what_a_sync_and_an_import_wrote_between_its_polls(
    tmp_path: Path,
    server: Callable[..., POP3TestServer],
    daemons: Callable[..., Harness],
    ledger_url: str,
) -> None:
    retrs = RetrLog()
    first = messages(5, 1)
    srv = server(first, on_command=retrs)
    cfg = write_config(tmp_path, [account("a", srv.port, interval=3600)], ledger_url=ledger_url)
    h = daemons(cfg)
    assert h.wait_polls("a", 1, timeout=30)[0].report.counts.fetched == 5
    assert poll_now(h, "a").report.counts.fetched == 0
    known = h.daemon._known
    hits = known.hits
    assert poll_now(h, "a").report.counts.fetched == 0
    assert known.hits == hits + 1, "a poll with nothing new read all the rows again"

    # Another process fetches new mail into the same ledger...
    synced = messages(3, 2)
    srv.store.add_many(synced)
    done = run_sync(cfg)
    assert done.returncode == 0, done.stderr
    # ... and another adopts two more from fetchmail's state file.
    adopted = [srv.store.add(m) for m in messages(2, 3)]
    ids = tmp_path / ".fetchids"
    ids.write_bytes(b"".join(b"user@127.0.0.1 " + uid + b"\n" for uid in adopted))
    done = popsync("-c", str(cfg), "import", "a", "--from", "fetchmail", str(ids))
    assert done.returncode == 0, done.stderr

    third = poll_now(h, "a")
    assert third.report.counts.fetched == 0
    counts = retrs.counts()
    assert len(counts) == 8 and max(counts.values()) == 1, "a message was fetched twice"
    maildir = h.config.select(["a"])[0].maildir
    assert_exactly_once(maildir, [*first, *synced])


def test_rows_kept_through_a_poll_cut_mid_fetch_fetch_the_rest_exactly_once(
    tmp_path: Path,
    server: Callable[..., POP3TestServer],
    daemons: Callable[..., Harness],
    ledger_url: str,
) -> None:
    """A poll whose session breaks after some messages were delivered has
    patched the kept rows with what it committed; the next poll fetches the
    rest from them, without reading the ledger whole again."""
    retrs = RetrLog()
    mail = messages(6, 4)
    srv = server(mail[:1], on_command=retrs)
    cfg = write_config(tmp_path, [account("a", srv.port, interval=3600)], ledger_url=ledger_url)
    # Retries only on request: the test decides when the fault is gone.
    h = daemons(cfg, backoff=Backoff(base=3600))
    h.wait_polls("a", 1, timeout=30)
    poll_now(h, "a")  # the account's counter now exists: its rows are kept
    known = h.daemon._known
    reads = known.reads
    srv.store.add_many(mail[1:])
    srv.faults = Faults(drop_during_retr=(4, 100))  # the third new message breaks off
    h.daemon.request_poll_now()
    cut = h.wait_polls("a", 3, timeout=30)[2]
    assert not cut.report.ok
    srv.faults = Faults()
    rest = poll_now(h, "a")
    # The two fetched before the break were committed (and kept): not again.
    assert rest.report.counts.fetched == 3
    assert known.reads == reads, "the kept rows were read again after the poll's own writes"
    maildir = h.config.select(["a"])[0].maildir
    assert_exactly_once(maildir, mail)
    # Only the message cut off was sent twice.
    assert sorted(retrs.counts().values()) == [1, 1, 1, 1, 1, 2]


@pytest.mark.slow
def test_two_workers_on_postgresql_see_each_others_polls(
    tmp_path: Path,
    server: Callable[..., POP3TestServer],
    daemons: Callable[..., Harness],
    postgres_url: str,
) -> None:
    """Workers take turns at an account; each keeps rows, and a poll by the
    other moves the generation, so the next poll here reads them again."""
    retrs = RetrLog()
    mail = messages(12, 5)
    srv = server(mail[:2], on_command=retrs)
    cfg = write_config(tmp_path, [account("a", srv.port)], ledger_url=postgres_url)
    workers = [daemons(cfg), daemons(cfg)]
    fed = 2

    def both_polled_twice() -> bool:
        nonlocal fed
        if fed < len(mail):  # new mail for (almost) every poll
            srv.store.add(mail[fed])
            fed += 1
        done = [len([e for e in w.polls("a") if e.report.ok]) >= 2 for w in workers]
        # Workers claim in turn only by chance: one that has had its two
        # polls stops (giving its lease back), so the other's come for sure.
        for w, enough in zip(workers, done, strict=True):
            if enough and not all(done) and w.thread.is_alive():
                w.stop()
        return all(done)

    wait_until(both_polled_twice, timeout=60, interval=0.5, what="two polls by each worker")
    srv.store.add_many(mail[fed:])
    polls = sum(len(w.polls("a")) for w in workers)
    wait_until(
        lambda: sum(len(w.polls("a")) for w in workers) >= polls + 2,
        timeout=30,
        what="two more polls",
    )
    for w in workers:
        if w.thread.is_alive():
            w.stop()
    events = [e for w in workers for e in w.polls("a")]
    assert all(e.report.ok or e.outcome.kind == "busy" for e in events), [
        e.report.error for e in events
    ]
    counts = retrs.counts()
    assert max(counts.values()) == 1, "a message was fetched twice"
    assert_exactly_once(workers[0].config.select(["a"])[0].maildir, mail)


def test_a_reload_drops_the_rows_of_removed_accounts(
    tmp_path: Path,
    server: Callable[..., POP3TestServer],
    daemons: Callable[..., Harness],
) -> None:
    srv = server(messages(2, 6), exclusive_lock=False)
    both = [account("a", srv.port, interval=3600), account("b", srv.port, interval=3600)]
    cfg = write_config(tmp_path, both, ledger_url=f"sqlite:///{tmp_path / 'ledger.db'}")
    h = daemons(cfg)
    h.wait_polls("a", 1, timeout=30)
    h.wait_polls("b", 1, timeout=30)
    poll_now(h, "a")
    poll_now(h, "b")
    assert h.daemon._known.accounts() == {"a", "b"}
    write_config(tmp_path, both[:1], ledger_url=f"sqlite:///{tmp_path / 'ledger.db'}")
    h.daemon.request_reload()
    wait_until(lambda: h.daemon._known.accounts() == {"a"}, what="b's rows dropped")
