"""I1 and I4 against a server that lies about sizes or identities, driven
through whole polls (``run_account``), not just the parser.

* a body longer than its LIST size allows is cut off at a limit derived
  from that size: nothing of it is kept, the message is skipped and left on
  the server, and the rest of the mailbox is fetched;
* an endless body ends the same way, quickly;
* a server whose unique-ids change on every session never gets a DELE for
  a message popsync has not confirmed (every DELE is checked by the same
  hook as the durability-order test); its renumbered mail is recognised,
  not fetched again.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from popsync.ledger import Ledger
from popsync.sync import body_limit, run_account
from popsync.testing.faults import Faults
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages, sample_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import load, maildir_contents, stored_form, write_config
from tests.promises.test_durability_order import Spy, Watch, spy

__all__ = ["spy"]  # the fixture

pytestmark = pytest.mark.timeout(60)

BIG = b"Subject: big\n\n" + b"x" * 77 + b"\n" * 1 + (b"y" * 99 + b"\n") * 3000  # ~300 KB


def test_body_past_its_list_size_is_cut_off_at_a_size_derived_limit(tmp_path: Path) -> None:
    messages = [BIG, *sample_messages()[:2]]
    faults = Faults(wrong_list_size={1: 1000})
    assert body_limit(1000, None) < len(BIG)  # the premise: the lie is caught
    with POP3TestServer(MailStore(messages), faults=faults) as server:
        cfg = load(write_config(tmp_path, [{"name": "acct", "port": server.port}]))
        acct = cfg.accounts[0]
        with Ledger.open(cfg.ledger_url) as ledger:
            report = run_account(acct, ledger, cfg.state_dir)
            rows = ledger.rows("acct")
    assert report.ok and report.counts.skipped == 1
    assert set(maildir_contents(acct.maildir)) == {stored_form(m) for m in messages[1:]}
    big_row = rows[(server.store.uids()[0], 0)]
    assert big_row.state == "skipped" and "cut off" in (big_row.skip_reason or "")


def test_endless_body_is_cut_off_quickly(tmp_path: Path) -> None:
    messages = sample_messages()[:3]
    with POP3TestServer(MailStore(messages), faults=Faults(endless_body=2)) as server:
        cfg = load(write_config(tmp_path, [{"name": "acct", "port": server.port}]))
        acct = cfg.accounts[0]
        with Ledger.open(cfg.ledger_url) as ledger:
            started = time.monotonic()
            report = run_account(acct, ledger, cfg.state_dir)
            elapsed = time.monotonic() - started
    assert report.ok and report.counts.skipped == 1 and report.counts.fetched == 2
    assert elapsed < 10, f"an endless body kept the poll busy for {elapsed:.1f} s"
    assert set(maildir_contents(acct.maildir)) == {
        stored_form(messages[0]),
        stored_form(messages[2]),
    }


def test_changing_uids_never_earn_an_unconfirmed_dele(tmp_path: Path, spy: Spy) -> None:
    messages = list(generate_messages(12, 1500, seed=8))
    store = MailStore(messages)
    with POP3TestServer(store, faults=Faults(changing_uids=True)) as server:
        cfg = load(
            write_config(tmp_path, [{"name": "acct", "port": server.port, "delete_after_days": 1}])
        )
        acct = cfg.accounts[0]
        with Ledger.open(cfg.ledger_url) as ledger:
            watch = Watch(ledger, "acct", acct.maildir, spy)
            server.on_command = watch
            assert run_account(acct, ledger, cfg.state_dir).ok
            later = time.time() + 3 * 86400
            second = run_account(acct, ledger, cfg.state_dir, now=lambda: later)
    assert second.ok
    # Every UID looked new: each message was recognised by its size and
    # TOP headers as a copy already held (remapped, not fetched again), and
    # only then, confirmed by TOP once more, deleted.  No DELE ever went to
    # a unique-id the ledger did not hold as durably delivered.
    assert (second.counts.remapped, second.counts.fetched) == (12, 0)
    assert len(store) == 0 and watch.deles == 12 and watch.violations == []
    assert maildir_contents(acct.maildir) == Counter(stored_form(m) for m in messages)
