"""Mail-loss paths a broken or hostile server opens, and real servers' quirks.

Each test drives a whole poll (``run_account``) or the ``popsync`` command
against the project's test server, with the fault or quirk switched on:

* a body that ends early at a stray unstuffed ``.`` line, or far short of
  its LIST size, is never stored as delivered and its original never DELEd;
* a unique-id the server reuses is never a licence to DELE: without TOP
  nothing unconfirmed is deleted, and a message that is clearly another
  one is fetched as new;
* one message that always fails or runs past its size cannot block the rest;
* mbox servers that rewrite status fields, Courier's UTF8 wrapper, and
  duplicate unique-ids behave as a user would want.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from popsync.cli import main as cli_main
from popsync.sync import PollReport, run_account
from popsync.testing.faults import Faults
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import sample_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import maildir_contents, maildir_files, stored_form, write_config
from tests.test_sync import Env, make_env

__all__ = ["make_env"]  # the fixture, shared with test_sync

pytestmark = pytest.mark.timeout(120)

DAY = 86400.0


def poll_at(env: Env, days: float) -> PollReport:
    """A poll as if *days* had passed since now."""
    later = time.time() + days * DAY
    return run_account(env.account, env.ledger, env.config.state_dir, now=lambda: later)


def stored(env: Env) -> set[bytes]:
    return set(maildir_contents(env.maildir))


def retr_numbers(server: POP3TestServer, session: int = -1) -> list[bytes]:
    record = server.sessions[session]
    return [line.split()[1] for line, _ in record.commands if line.startswith(b"RETR")]


# -- bodies that end early ------------------------------------------------------------


@pytest.mark.parametrize("broken", [2, 3], ids=["middle", "last"])
@pytest.mark.parametrize("delete_after_days", [0, None], ids=["delete", "mirror"])
def test_body_ended_by_a_stray_dot_is_never_stored_nor_deleted(
    make_env: Any, broken: int, delete_after_days: int | None
) -> None:
    messages = sample_messages()[:3]
    env = make_env(
        list(messages),
        faults=Faults(unstuffed_dot_line=broken),
        delete_after_days=delete_after_days,
    )
    for _ in range(2):
        report = env.poll()
        assert not report.ok and "expected +OK or -ERR" in (report.error or "")
        # Nothing truncated is ever stored; the server still has everything.
        assert stored(env) <= {stored_form(m) for m in messages}
        assert stored_form(messages[broken - 1]) not in stored(env)
        assert len(env.store) == 3
    # The next poll fetched the broken message last: the others are all in.
    assert stored(env) == {stored_form(m) for i, m in enumerate(messages, 1) if i != broken}
    assert env.ledger.rows("acct")[(env.store.uids()[broken - 1], 0)].state == "fetching"

    env.server.faults = Faults()  # the server is fixed
    assert env.poll().ok
    env.expect_exactly_once(list(messages))
    assert len(env.store) == (0 if delete_after_days == 0 else 3)


def test_body_far_shorter_than_list_size_is_not_trusted(make_env: Any) -> None:
    messages = sample_messages()[:3]
    true_size = MailStore([messages[1]]).messages()[0].size
    env = make_env(
        list(messages), faults=Faults(wrong_list_size={2: true_size + 5000}), delete_after_days=0
    )
    report = env.poll()
    assert not report.ok and "LIST said" in (report.error or "")
    assert stored(env) == {stored_form(messages[0]), stored_form(messages[2])}
    assert len(env.store) == 1  # only the untrusted one is left on the server
    # A small difference is no reason to refuse good mail.
    env.server.faults = Faults(wrong_list_size={1: true_size + 40})
    assert env.poll().ok
    env.expect_exactly_once(list(messages))


# -- unique-ids reused by the server --------------------------------------------------

ORIGINAL = b"Subject: first\nFrom: a@example.org\n\nbody\n"
SAME_SIZE = b"Subject: other\nFrom: a@example.org\n\nbody\n"
OTHER = b"Subject: quite another message\nFrom: b@example.org\n\nanother body, longer\n"


def reuse(env: Env, data: bytes) -> None:
    env.store.remove(b"reused")
    env.store.add(data, uid=b"reused")


def test_reused_uid_on_a_server_without_top_is_never_deleted(make_env: Any) -> None:
    env = make_env([], server_kw={"top": False}, delete_after_days=3)
    env.store.add(ORIGINAL, uid=b"reused")
    assert env.poll().ok
    reuse(env, SAME_SIZE)  # same size: LIST cannot tell
    report = poll_at(env, 4)
    assert report.ok and report.counts.deleted == 0
    assert [w for w in report.warnings if "refused TOP" in w]
    assert env.store.uids() == [b"reused"]
    # TOP was tried although CAPA did not offer it; -ERR meant "cannot confirm".
    assert any(line == b"TOP 1 0" for line, _ in env.server.sessions[-1].commands)
    again = poll_at(env, 5)
    assert again.ok and again.warnings == [] and env.store.uids() == [b"reused"]
    assert env.ledger.counts("acct")["withheld"] == 1  # `popsync status` shows it


def test_reused_uid_naming_another_message_is_fetched_as_new(make_env: Any) -> None:
    env = make_env([], delete_after_days=3)
    env.store.add(ORIGINAL, uid=b"reused")
    assert env.poll().ok
    reuse(env, OTHER)
    report = poll_at(env, 4)
    assert report.ok and report.counts.fetched == 1 and report.counts.deleted == 0
    assert [w for w in report.warnings if "now names another message" in w]
    assert stored(env) == {ORIGINAL, OTHER}
    rows = env.ledger.rows("acct")
    assert rows[(b"reused", 0)].sha256 is not None
    assert [uid for uid, _ in rows if uid.startswith(b"reused retired ")]
    # Once due, the new message is confirmed and deleted like any other.
    assert poll_at(env, 8).counts.deleted == 1 and len(env.store) == 0
    assert stored(env) == {ORIGINAL, OTHER}


# -- one message must not block the others ----------------------------------------------


def test_endless_body_is_cut_off_skipped_and_the_rest_fetched(make_env: Any) -> None:
    messages = sample_messages()[:4]
    env = make_env(list(messages), faults=Faults(endless_body=1), delete_after_days=0)
    report = env.poll()
    assert report.ok, report.error
    assert report.counts.skipped == 1 and report.counts.fetched == 3
    assert [w for w in report.warnings if "cut off" in w and "stays on the server" in w]
    assert stored(env) == {stored_form(m) for m in messages[1:]}
    assert [m.data for m in env.store.messages()] == [messages[0]]  # left on the server
    later = env.poll()
    assert later.ok and retr_numbers(env.server) == []  # not tried again
    assert len(env.store) == 1


def test_message_that_always_fails_goes_last_and_starves_nothing(make_env: Any) -> None:
    messages = sample_messages()[:4]
    env = make_env(list(messages), faults=Faults(drop_during_retr=(1, 40)))
    first = env.poll()
    assert not first.ok
    second = env.poll()
    assert not second.ok
    assert retr_numbers(env.server)[-1] == b"1"  # tried after the others
    assert stored(env) == {stored_form(m) for m in messages[1:]}
    assert env.ledger.rows("acct")[(env.store.uids()[0], 0)].attempts == 2


# -- real servers' quirks ---------------------------------------------------------------


def test_mbox_server_rewriting_status_fields_still_gets_its_deletions(make_env: Any) -> None:
    messages = sample_messages()[:3]
    env = make_env(list(messages), server_kw={"mbox_status": True}, delete_after_days=1)
    before = [m.size for m in env.store.messages()]
    assert env.poll().counts.fetched == 3
    assert [m.size for m in env.store.messages()] != before  # LIST sizes grew
    assert all(b"X-UID: " in m.data for m in env.store.messages())
    report = poll_at(env, 2)
    assert report.ok and report.counts.deleted == 3 and report.warnings == []
    assert len(env.store) == 0
    env.expect_exactly_once(list(messages))


RAW_UTF8 = "Subject: Grüße aus Köln\nFrom: Jürgen <j@example.de>\n\nHallo\n".encode()


def test_utf8_is_sent_so_courier_serves_the_message_itself(make_env: Any) -> None:
    messages = [RAW_UTF8, sample_messages()[0]]
    env = make_env(list(messages), server_kw={"utf8_wrapper": True}, delete_after_days=1)
    assert env.poll().ok
    env.expect_exactly_once(messages)  # the message, not a generated wrapper
    commands = [line.split(b" ")[0] for line, _ in env.server.sessions[-1].commands]
    assert commands.index(b"UTF8") < commands.index(b"AUTH")  # RFC 6856 §2: before login
    # TOP serves the message itself too, so its later deletion is confirmed.
    report = poll_at(env, 2)
    assert report.ok and report.counts.deleted == 2 and report.warnings == []


# -- our own bugs stay one line per account ---------------------------------------------


def test_an_internal_error_is_one_line_and_the_other_accounts_still_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import popsync.sync

    real = popsync.sync.Poll.note

    def broken(self: Any, the_plan: Any) -> None:
        if self.name == "bad":
            raise ZeroDivisionError("division by zero")
        real(self, the_plan)

    monkeypatch.setattr(popsync.sync.Poll, "note", broken)
    with POP3TestServer(MailStore(sample_messages())) as srv:
        cfg = write_config(
            tmp_path, [{"name": "bad", "port": srv.port}, {"name": "good", "port": srv.port}]
        )
        assert cli_main(["-c", str(cfg), "sync", "--no-progress"]) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "bad" in line]
    assert len(lines) == 1 and "internal error: ZeroDivisionError" in lines[0]
    assert "Traceback" not in captured.err
    assert len(maildir_files(tmp_path / "Maildir" / "good")) == len(sample_messages())


def test_received_header_is_prepended_and_identity_ignores_it(make_env: Any) -> None:
    messages = sample_messages()[:2]
    env = make_env(list(messages), received_header=True, delete_after_days=1)
    assert env.poll().ok
    stored_files = sorted(maildir_contents(env.maildir))
    for data in stored_files:
        head, rest = data.split(b"\n\tby popsync (account acct);\n\t", 1)
        assert head == b"Received: from 127.0.0.1"
        assert rest.split(b"\n", 1)[1] in {stored_form(m) for m in messages}
    # The added field is ours: the messages are still recognised for deletion.
    later = poll_at(env, 2)
    assert later.ok and later.counts.deleted == 2 and later.warnings == []
