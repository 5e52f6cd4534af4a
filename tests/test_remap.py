"""A server that renumbers its unique-ids costs no duplicate.

When a listing holds unique-ids the ledger does not know while delivered
rows of the same size vanished from it, popsync compares the two with
``TOP n 0`` before fetching: a message whose stable header digest matches
exactly one such row takes the row over (``remapped``) and is not fetched.
Anything ambiguous, or a server without TOP, falls back to fetching: a
duplicate is better than lost mail.

Driven through whole polls against the project's test server (the
``changing_uids`` fault renumbers every session) and a real Dovecot whose
``pop3_uidl_format`` changes between two polls.
"""

from __future__ import annotations

import json
import poplib
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from popsync.config import Account
from popsync.errors import LedgerError
from popsync.ledger import Delivered, FetchIntent, Key, Ledger, LedgerRow
from popsync.ledger.models import MessageState
from popsync.plan import ServerMessage, match_remaps, remap_candidates
from popsync.sync import PollReport, format_summary, run_account
from popsync.testing.faults import Faults
from popsync.testing.mailstore import MailStore, StoredMessage
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from popsync.testing.server_state import SessionState
from tests.helpers import (
    load,
    maildir_contents,
    run_sync,
    stored_form,
    wait_until,
    write_config,
)
from tests.servers.dovecot import Dovecot, Mailbox

pytestmark = pytest.mark.timeout(120)


class Commands:
    """Server hook: counts the commands each poll sends, by verb."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: Counter[str] = Counter()

    def __call__(self, state: SessionState, line: bytes) -> bytes | None:
        with self._lock:
            self.seen[line.split(b" ", 1)[0].decode("ascii", "replace").upper()] += 1
        return None

    def take(self) -> Counter[str]:
        with self._lock:
            out, self.seen = self.seen, Counter()
        return out


def account(tmp_path: Path, port: int, **extra: object) -> Account:
    return load(write_config(tmp_path, [{"name": "acct", "port": port, **extra}])).accounts[0]


def poll(acct: Account, ledger: Ledger, state_dir: Path, now: float | None = None) -> PollReport:
    report = run_account(acct, ledger, state_dir, now=(lambda: now) if now else time.time)
    assert report.ok, report.error
    return report


# -- through whole polls: the test server -------------------------------------------------


def test_renumbered_reordered_mailbox_fetches_only_the_new_then_deletes_all(
    tmp_path: Path,
) -> None:
    first = list(generate_messages(10, 2000, seed=11))
    added = list(generate_messages(2, 2000, seed=12))
    store = MailStore(first)
    commands = Commands()
    with POP3TestServer(store, faults=Faults(changing_uids=True), on_command=commands) as server:
        mirror = account(tmp_path, server.port)
        with Ledger.open(load(tmp_path / "config.yaml").ledger_url) as ledger:
            state_dir = load(tmp_path / "config.yaml").state_dir
            assert poll(mirror, ledger, state_dir).counts.fetched == 10
            commands.take()
            # Reorder the mailbox and add two messages among the old ones.
            for uid in store.uids():
                store.remove(uid)
            store.add_many([first[9], added[0], *reversed(first[:9]), added[1]])
            second = poll(mirror, ledger, state_dir)
            sent = commands.take()
            assert (second.counts.fetched, second.counts.remapped) == (2, 10)
            # TOP for the unknown ones of a vanished size; RETR for the new only.
            assert sent["RETR"] == 2 and 10 <= sent["TOP"] <= 12
            assert "10 remapped" in format_summary(second)
            # Delete mode: the server renumbers again; every copy is
            # confirmed and deleted, none fetched again.
            deleting = account(tmp_path, server.port, delete_after_days=0)
            third = poll(deleting, ledger, state_dir)
            counts = third.counts
            assert (counts.fetched, counts.remapped, counts.deleted) == (0, 12, 12)
            rows = ledger.rows("acct")
            assert ledger.last_polls()["acct"].counts.remapped == 12
    assert len(store) == 0
    assert maildir_contents(mirror.maildir) == Counter(stored_form(m) for m in first + added)
    assert {r.state for r in rows.values()} == {"deleted"}


def test_a_poll_with_nothing_renumbered_sends_no_top(tmp_path: Path) -> None:
    messages = list(generate_messages(6, 1500, seed=13))
    store = MailStore(messages[:4])
    commands = Commands()
    with POP3TestServer(store, on_command=commands) as server:
        acct = account(tmp_path, server.port)
        cfg = load(tmp_path / "config.yaml")
        with Ledger.open(cfg.ledger_url) as ledger:
            poll(acct, ledger, cfg.state_dir)
            # Only new mail: unknown unique-ids, nothing vanished.
            store.add_many(messages[4:])
            commands.take()
            assert poll(acct, ledger, cfg.state_dir).counts.fetched == 2
            assert commands.take()["TOP"] == 0
            # Only vanished mail: nothing unknown.
            store.remove(store.uids()[0])
            report = poll(acct, ledger, cfg.state_dir)
            assert commands.take()["TOP"] == 0 and report.counts.remapped == 0


def test_identical_messages_are_ambiguous_and_fetched_again(tmp_path: Path) -> None:
    twin = next(generate_messages(1, 1500, seed=14))
    store = MailStore([twin, twin])
    commands = Commands()
    with POP3TestServer(store, faults=Faults(changing_uids=True), on_command=commands) as server:
        acct = account(tmp_path, server.port)
        cfg = load(tmp_path / "config.yaml")
        with Ledger.open(cfg.ledger_url) as ledger:
            poll(acct, ledger, cfg.state_dir)
            commands.take()
            report = poll(acct, ledger, cfg.state_dir)
    # Each copy matches both rows: no guess; both are fetched.
    assert (report.counts.remapped, report.counts.fetched) == (0, 2)
    assert commands.take()["RETR"] == 2


def test_a_server_without_top_falls_back_to_fetching(tmp_path: Path) -> None:
    messages = list(generate_messages(3, 1500, seed=15))
    faults = Faults(changing_uids=True, errors={"TOP": b"-ERR no such command"})
    with POP3TestServer(MailStore(messages), faults=faults) as server:
        acct = account(tmp_path, server.port)
        cfg = load(tmp_path / "config.yaml")
        with Ledger.open(cfg.ledger_url) as ledger:
            poll(acct, ledger, cfg.state_dir)
            report = poll(acct, ledger, cfg.state_dir)
    assert (report.counts.remapped, report.counts.fetched) == (0, 3)


def test_same_size_other_headers_is_not_taken_for_a_known_message(tmp_path: Path) -> None:
    old = b"From: a@example.org\nSubject: one\n\nbody\n"
    new = b"From: a@example.org\nSubject: two\n\nbody\n"
    store = MailStore([old])
    with POP3TestServer(store) as server:
        mirror = account(tmp_path, server.port)
        cfg = load(tmp_path / "config.yaml")
        with Ledger.open(cfg.ledger_url) as ledger:
            poll(mirror, ledger, cfg.state_dir)
            store.remove(store.uids()[0])
            store.add(new)
            report = poll(
                account(tmp_path, server.port, delete_after_days=0), ledger, cfg.state_dir
            )
    assert (report.counts.remapped, report.counts.fetched) == (0, 1)
    assert set(maildir_contents(mirror.maildir)) == {stored_form(old), stored_form(new)}


def test_a_top_past_its_size_is_left_out_and_the_rest_remapped(tmp_path: Path) -> None:
    # X's header section alone is far longer than the size LIST claims for
    # it (Y's size, so X is a candidate for Y's row): TOP X is cut off.
    y = next(generate_messages(1, 1500, seed=19))
    x = b"".join(b"X-Filler-%d: %s\n" % (i, b"f" * 90) for i in range(2000)) + b"\nbody\n"
    store = MailStore([x, y])
    size_of_y = StoredMessage(b"y", y).size
    with POP3TestServer(store, faults=Faults(wrong_list_size={1: size_of_y})) as server:
        acct = account(tmp_path, server.port)
        cfg = load(tmp_path / "config.yaml")
        with Ledger.open(cfg.ledger_url) as ledger:
            first = poll(acct, ledger, cfg.state_dir)
            assert (first.counts.fetched, first.counts.skipped) == (1, 1)  # X is cut off
            for uid in store.uids():  # renumber, same order
                store.remove(uid)
            store.add(x, b"new-x")
            store.add(y, b"new-y")
            second = poll(acct, ledger, cfg.state_dir)
    assert (second.counts.remapped, second.counts.fetched) == (1, 0)
    assert any("TOP ran past the size" in w for w in second.warnings)
    assert maildir_contents(acct.maildir) == Counter([stored_form(y)])


# -- a real Dovecot whose pop3_uidl_format changes ----------------------------------------


def uidls(mailbox: Mailbox) -> list[bytes]:
    client = poplib.POP3(mailbox.host, mailbox.pop3_port, timeout=10)
    try:
        client.user(mailbox.user)
        client.pass_(mailbox.password)
        _, lines, _ = client.uidl()
        return [line.split(b" ", 1)[1] for line in lines]
    finally:
        client.quit()


def uidl_format(fmt: str) -> dict[str, str]:
    """The userdb field that sets one user's UIDL format (``%`` escaped:
    Dovecot expands variables in passwd-file extra fields)."""
    return {"pop3_uidl_format": fmt.replace("%", "%%")}


# Pairs of formats that renumber a Maildir (``pop3_save_uidl`` is off, as by
# default, so Dovecot computes the UIDL from the format on every login).
# Each pair differs in length, so the rewritten passwd-file differs in size
# and Dovecot rereads it at once.


@pytest.mark.parametrize(("before", "after"), [("%08Xu%08Xv", "%u"), ("%v.%u", "%f")])
def test_dovecot_uidl_format_change_downloads_nothing_again(
    dovecot: Dovecot, tmp_path: Path, before: str, after: str
) -> None:
    user = f"remap{secrets.token_hex(4)}"
    dovecot.add_user(user, secrets.token_urlsafe(12), userdb_fields=uidl_format(before))
    mailbox = Mailbox(dovecot, user)
    try:
        mailbox.add_messages(generate_messages(8, 3000, seed=16))
        acct = account(
            tmp_path, mailbox.pop3_port, username=user, secret=mailbox.password, timeout=10
        )
        cfg = load(tmp_path / "config.yaml")
        with Ledger.open(cfg.ledger_url) as ledger:
            old = uidls(mailbox)
            assert poll(acct, ledger, cfg.state_dir).counts.fetched == 8
            dovecot.set_userdb_fields(user, uidl_format(after))
            new: list[bytes] = wait_until(
                lambda: got if (got := uidls(mailbox)) != old else None,
                what=f"Dovecot to list UIDLs in the format {after!r}",
            )
            assert not set(old) & set(new)  # the premise: every unique-id changed
            mailbox.add_message(next(generate_messages(1, 3000, seed=17)))
            report = poll(acct, ledger, cfg.state_dir)
    finally:
        mailbox.clear()
    assert (report.counts.remapped, report.counts.fetched) == (8, 1)
    assert len(maildir_contents(acct.maildir)) == 9


# -- the pure parts -----------------------------------------------------------------------


def row(
    uid: bytes, size: int, digest: str | None, row_id: int, state: MessageState = "delivered"
) -> LedgerRow:
    return LedgerRow(
        row_id, "acct", uid, 0, state, size, size, "0" * 64, f"n{row_id}", 0.0, 0.0, None, 0.0,
        None, None, size, digest, 0, 0, 0, None, "maildir", None,
    )  # fmt: skip


def rows_of(*items: LedgerRow) -> dict[Key, LedgerRow]:
    return {r.key: r for r in items}


def listed(*items: tuple[int, bytes, int]) -> Sequence[ServerMessage]:
    return [ServerMessage(msg, uid, 0, size) for msg, uid, size in items]


def test_candidates_need_unknown_uids_and_vanished_rows_of_that_size() -> None:
    rows = rows_of(row(b"a", 100, "d1", 1), row(b"b", 200, "d2", 2))
    # Nothing unknown: no candidate, whatever vanished.
    assert remap_candidates(listed((1, b"a", 100)), rows, rows.values()) == {}
    # Unknown, but nothing vanished.
    assert (
        remap_candidates(
            listed((1, b"a", 100), (2, b"b", 200), (3, b"x", 100)), rows, rows.values()
        )
        == {}
    )
    # Unknown and vanished: paired by size only.
    found = remap_candidates(listed((1, b"x", 100), (2, b"y", 300)), rows, rows.values())
    assert {msg: [r.uid for r in rs] for msg, rs in found.items()} == {1: [b"a"]}


def test_candidates_leave_out_rows_not_delivered_or_without_a_digest() -> None:
    rows = rows_of(
        row(b"a", 100, "d1", 1, state="deleted"),
        row(b"b", 100, None, 2),
        row(b"c", 100, "d3", 3, state="fetching"),
    )
    assert remap_candidates(listed((1, b"x", 100)), rows, rows.values()) == {}


def test_matches_are_made_only_when_unambiguous() -> None:
    a, b, c = row(b"a", 100, "d1", 1), row(b"b", 100, "d1", 2), row(b"c", 100, "d3", 3)
    messages = listed((1, b"x", 100), (2, b"y", 100), (3, b"z", 100))
    candidates = {1: [a, b, c], 2: [a, b, c], 3: [a, b, c]}
    # x and y both look like a and b: no pair; z is c; a refused TOP is no match.
    found = match_remaps(messages, candidates, {1: "d1", 2: "d1", 3: "d3"})
    assert [(m.message.uid, m.row.uid) for m in found] == [(b"z", b"c")]
    assert match_remaps(messages, candidates, {3: None}) == []
    # Two messages claiming one row: neither takes it.
    assert match_remaps(messages, {1: [c], 3: [c]}, {1: "d3", 3: "d3"}) == []


# -- the ledger ---------------------------------------------------------------------------


def delivered_ledger(url: str, uids: Sequence[bytes]) -> Ledger:
    ledger = Ledger.open(url)
    ledger.begin_fetch("acct", [FetchIntent(u, 0, 10, f"name-{u.decode()}", 1.0) for u in uids])
    ledger.mark_delivered("acct", [Delivered(u, 0, 10, "a" * 64, 2.0) for u in uids[:-1]])
    return ledger


def test_ledger_remap_moves_the_row_and_keeps_it_whole(ledger_url: str) -> None:
    with delivered_ledger(ledger_url, [b"a", b"b", b"f"]) as ledger:
        before = ledger.rows("acct")
        ledger.remap("acct", [((b"a", 0), (b"x", 0)), ((b"b", 0), (b"y", 1))], 5.0)
        after = ledger.rows("acct")
    assert set(after) == {(b"x", 0), (b"y", 1), (b"f", 0)}
    moved = after[(b"x", 0)]
    assert moved.id == before[(b"a", 0)].id and moved.maildir_name == "name-a"
    assert moved.state == "delivered" and moved.last_seen == 5.0
    assert moved.previous_uid == b"a" and after[(b"f", 0)].previous_uid is None


@pytest.mark.parametrize(
    ("pairs", "error"),
    [
        ([((b"f", 0), (b"x", 0))], "expected a delivered row"),  # still fetching
        ([((b"z", 0), (b"x", 0))], "no row"),
        ([((b"a", 0), (b"b", 0))], "already has a row"),
        ([((b"a", 0), (b"x", 0)), ((b"b", 0), (b"x", 0))], "names the same message twice"),
    ],
)
def test_ledger_remap_refuses_what_would_lose_or_merge_rows(
    ledger_url: str, pairs: list[tuple[Key, Key]], error: str
) -> None:
    with delivered_ledger(ledger_url, [b"a", b"b", b"f"]) as ledger:
        before = ledger.rows("acct")
        with pytest.raises(LedgerError, match=error):
            ledger.remap("acct", pairs, 5.0)
        assert ledger.rows("acct") == before  # one transaction: nothing moved


def test_cli_summary_and_status_report_remapped(tmp_path: Path) -> None:
    store = MailStore(generate_messages(3, 1500, seed=18))
    with POP3TestServer(store, faults=Faults(changing_uids=True)) as server:
        config = write_config(tmp_path, [{"name": "acct", "port": server.port}])
        assert run_sync(config).returncode == 0
        second = run_sync(config)
    assert second.returncode == 0, second.stderr
    assert "3 remapped" in second.stdout + second.stderr
    status = subprocess.run(
        [sys.executable, "-m", "popsync", "-c", str(config), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (entry,) = json.loads(status.stdout)["accounts"]
    assert entry["last_poll"]["counts"]["remapped"] == 3
    assert entry["last_poll"]["counts"]["fetched"] == 0
