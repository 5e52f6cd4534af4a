"""``fetch_limit``: at most N messages fetched per poll, the rest by the next polls.

The planner cuts its fetch order (new messages first, those that failed
before last) after N and counts the rest as deferred; due deletions are
not limited.  End to end against the project's test server: every message
arrives exactly once over as many polls as the limit needs, and the
summary line and ``status --json`` say how many were deferred.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from popsync.cli import main as cli_main
from popsync.errors import ConfigError
from popsync.ledger import Ledger, LedgerRow
from popsync.plan import Policy, ServerMessage, join_listings, plan
from popsync.sync import format_summary, run_account
from popsync.testing.faults import Faults
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import load, maildir_contents, stored_form, write_config
from tests.test_plan import row as plan_row

pytestmark = pytest.mark.timeout(60)

NOW = 1_700_000_000.0


def row(
    uid: bytes, state: str, *, attempts: int = 0, delivered_days_ago: float | None = None
) -> LedgerRow:
    """A ledger row as the planner tests make it, with a file name of its own."""
    return plan_row(
        uid,
        state,
        attempts=attempts,
        delivered_days_ago=delivered_days_ago,
        name=f"1.P{uid.hex():0<32}.host",
    )


def listing(*uids: bytes) -> list[ServerMessage]:
    out, _ = join_listings(
        [(i, u) for i, u in enumerate(uids, 1)], [(i, 100) for i in range(1, len(uids) + 1)]
    )
    return out


# -- the planner ---------------------------------------------------------------------


def test_the_limit_keeps_the_first_in_plan_order_and_defers_the_rest() -> None:
    result = plan(listing(b"a", b"b", b"c", b"d", b"e"), {}, Policy(now=NOW, fetch_limit=2))
    assert [f.message.uid for f in result.fetch] == [b"a", b"b"]
    assert result.deferred == 3


def test_no_limit_and_a_limit_not_reached_defer_nothing() -> None:
    messages = listing(b"a", b"b", b"c")
    assert plan(messages, {}, Policy(now=NOW)).deferred == 0
    result = plan(messages, {}, Policy(now=NOW, fetch_limit=3))
    assert (len(result.fetch), result.deferred) == (3, 0)


def test_messages_that_failed_before_are_the_ones_deferred() -> None:
    rows = {
        (b"a", 0): row(b"a", "fetching", attempts=2),
        (b"b", 0): row(b"b", "fetching", attempts=1),
    }
    result = plan(listing(b"a", b"b", b"c", b"d"), rows, Policy(now=NOW, fetch_limit=3))
    # new ones first, then the failed ones, fewest failures first
    assert [f.message.uid for f in result.fetch] == [b"c", b"d", b"b"]
    assert result.deferred == 1


def test_due_deletions_are_not_limited() -> None:
    rows = {uid: row(uid[0], "delivered", delivered_days_ago=5) for uid in [(b"a", 0), (b"b", 0)]}
    result = plan(
        listing(b"a", b"b", b"c", b"d"), rows, Policy(now=NOW, delete_after_days=1, fetch_limit=1)
    )
    assert [d.message.uid for d in result.delete] == [b"a", b"b"]
    assert [f.message.uid for f in result.fetch] == [b"c"]
    assert result.deferred == 1


def test_a_spent_budget_fetches_nothing() -> None:
    result = plan(listing(b"a", b"b"), {}, Policy(now=NOW, fetch_limit=0))
    assert (result.fetch, result.deferred) == ((), 2)


# -- the config ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -3, "many", True])
def test_a_bad_fetch_limit_is_one_line_naming_the_key(tmp_path: Path, value: object) -> None:
    path = write_config(tmp_path, [{"name": "acct", "port": 1110, "fetch_limit": value}])
    with pytest.raises(ConfigError) as caught:
        load(path)
    text = str(caught.value)
    assert "account 'acct'" in text and "fetch_limit" in text, text
    assert len(text.splitlines()) == 1, text


def test_fetch_limit_is_optional(tmp_path: Path) -> None:
    path = write_config(tmp_path, [{"name": "acct", "port": 1110}])
    assert load(path).accounts[0].fetch_limit is None
    path = write_config(tmp_path, [{"name": "acct", "port": 1110, "fetch_limit": "25"}])
    assert load(path).accounts[0].fetch_limit == 25


# -- end to end ----------------------------------------------------------------------


def test_ten_messages_limit_four_arrive_as_four_four_two(tmp_path: Path) -> None:
    messages = list(generate_messages(10, 1500, seed=12))
    store = MailStore(messages)
    with POP3TestServer(store) as server:
        config = load(
            write_config(tmp_path, [{"name": "acct", "port": server.port, "fetch_limit": 4}])
        )
        account = config.accounts[0]
        with Ledger.open(config.ledger_url) as ledger:
            fetched, deferred, retrieved = [], [], []
            for poll in range(4):
                report = run_account(account, ledger, config.state_dir)
                assert report.ok, report.error
                fetched.append(report.counts.fetched)
                deferred.append(report.counts.deferred)
                record = server.wait_for_sessions(poll + 1)[poll]
                retrieved.append(
                    sorted(int(c.split()[1]) for c, _ in record.commands if c.startswith(b"RETR"))
                )
                if poll == 0:
                    assert "6 deferred (fetch_limit)" in format_summary(report)
                    assert report.counts.new == 10
            assert fetched == [4, 4, 2, 0]
            assert deferred == [6, 2, 0, 0]
            # the oldest first, each message retrieved by exactly one poll
            assert retrieved == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10], []]
            assert ledger.last_polls()["acct"].counts.deferred == 0
    contents = maildir_contents(account.maildir)
    assert set(contents) == {stored_form(m) for m in messages}
    assert all(n == 1 for n in contents.values()), "a message was delivered twice"
    assert len(store) == 10  # a mirror: nothing deleted


def test_deletions_still_happen_while_fetches_are_deferred(tmp_path: Path) -> None:
    messages = list(generate_messages(6, 1200, seed=13))
    store = MailStore(messages)
    with POP3TestServer(store) as server:
        config = load(
            write_config(
                tmp_path,
                [{"name": "acct", "port": server.port, "fetch_limit": 2, "delete_after_days": 0}],
            )
        )
        account = config.accounts[0]
        with Ledger.open(config.ledger_url) as ledger:
            first = run_account(account, ledger, config.state_dir)
            assert first.ok, first.error
            assert (first.counts.fetched, first.counts.deleted, first.counts.deferred) == (2, 2, 4)
            assert len(store) == 4
            for _ in range(2):
                assert run_account(account, ledger, config.state_dir).ok
    assert len(store) == 0
    contents = maildir_contents(account.maildir)
    assert set(contents) == {stored_form(m) for m in messages}
    assert all(n == 1 for n in contents.values())


def test_summary_and_status_json_report_deferred(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = MailStore(list(generate_messages(5, 800, seed=14)))
    with POP3TestServer(store) as server:
        path = write_config(tmp_path, [{"name": "acct", "port": server.port, "fetch_limit": 3}])
        assert cli_main(["-c", str(path), "sync", "--no-progress"]) == 0
        assert "2 deferred (fetch_limit)" in capsys.readouterr().out
        assert cli_main(["-c", str(path), "status"]) == 0
        assert "deferred 2 (fetch_limit" in capsys.readouterr().out
        assert cli_main(["-c", str(path), "status", "--json"]) == 0
        entry = json.loads(capsys.readouterr().out)["accounts"][0]
        assert entry["last_poll"]["counts"]["deferred"] == 2


BIG = b"Subject: big\n\n" + (b"y" * 99 + b"\n") * 3000  # ~300 KB


def test_a_fresh_session_after_a_cut_off_spends_what_is_left_of_the_limit(
    tmp_path: Path,
) -> None:
    small = list(generate_messages(4, 900, seed=15))
    messages = [small[0], BIG, *small[1:]]
    # The server says message 2 is 1000 octets: its body is cut off, and the
    # poll goes on in a fresh session -- with 3 - 1 fetched - 1 cut off = 1.
    faults = Faults(wrong_list_size={2: 1000})
    with POP3TestServer(MailStore(messages), faults=faults) as server:
        config = load(
            write_config(tmp_path, [{"name": "acct", "port": server.port, "fetch_limit": 3}])
        )
        account = config.accounts[0]
        with Ledger.open(config.ledger_url) as ledger:
            report = run_account(account, ledger, config.state_dir)
            assert report.ok, report.error
            assert (report.counts.fetched, report.counts.skipped) == (2, 1)
            assert report.counts.deferred == 2
            assert set(maildir_contents(account.maildir)) == {stored_form(m) for m in small[:2]}
            again = run_account(account, ledger, config.state_dir)
            assert (again.counts.fetched, again.counts.deferred) == (2, 0)
    assert set(maildir_contents(account.maildir)) == {stored_form(m) for m in small}
