"""End-to-end polls against the project's test server: real sockets, real
SQLite, real Maildirs.  Each test checks the promises (docs/design.md §2) directly:
what is in the Maildir, what is left on the server, what the ledger says."""

from __future__ import annotations

import errno
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from popsync.cli import main as cli_main
from popsync.config import Config
from popsync.ledger import Ledger
from popsync.sync import PollReport, run_account
from popsync.testing.faults import Faults
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages, sample_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import load, maildir_contents, maildir_files, stored_form, write_config

pytestmark = pytest.mark.timeout(120)


class Env:
    """One account on one test server, with its config, ledger and Maildir."""

    def __init__(
        self, tmp: Path, server: POP3TestServer, ledger_url: str | None = None, **account: Any
    ) -> None:
        self.tmp = tmp
        self.server = server
        self.store = server.store
        self.account_kw = {"name": "acct", "port": server.port, **account}
        self.config_path = write_config(tmp, [self.account_kw], ledger_url=ledger_url)
        self.config: Config = load(self.config_path)
        self.account = self.config.accounts[0]
        self.maildir = self.account.maildir
        self.ledger = Ledger.open(self.config.ledger_url)

    def poll(self) -> PollReport:
        return run_account(self.account, self.ledger, self.config.state_dir)

    def expect_exactly_once(self, messages: list[bytes]) -> None:
        contents = maildir_contents(self.maildir)
        expected = {stored_form(m) for m in messages}
        assert set(contents) == expected
        assert all(n == 1 for n in contents.values()), "a message was delivered twice"

    def close(self) -> None:
        self.ledger.close()


@pytest.fixture
def make_env(tmp_path: Path, ledger_url: str) -> Iterator[Any]:
    """Envs on the ledger of ``ledger_url``: each test runs on SQLite and on PostgreSQL."""
    made: list[tuple[Env, POP3TestServer]] = []

    def factory(
        messages: list[bytes] | None = None,
        *,
        faults: Faults | None = None,
        server_kw: dict[str, Any] | None = None,
        **account: Any,
    ) -> Env:
        store = MailStore(messages if messages is not None else sample_messages())
        server = POP3TestServer(store, faults=faults, **(server_kw or {})).start()
        env = Env(tmp_path, server, ledger_url, **account)
        made.append((env, server))
        return env

    yield factory
    for env, server in made:
        env.close()
        server.stop()


def test_500_messages_then_nothing_then_only_new(make_env: Any) -> None:
    messages = list(generate_messages(500, 2000, seed=3))
    env = make_env(messages)
    first = env.poll()
    assert first.ok, first.error
    assert (first.counts.listed, first.counts.new, first.counts.fetched) == (500, 500, 500)
    env.expect_exactly_once(messages)
    assert len(env.store) == 500  # mirror: the server keeps everything

    again = env.poll()
    assert again.ok and again.counts.fetched == 0 and again.counts.new == 0

    newer = list(generate_messages(7, 900, seed=99))
    for data in newer:
        env.store.add(data)
    third = env.poll()
    assert third.ok and third.counts.fetched == 7
    env.expect_exactly_once(messages + newer)
    rows = env.ledger.rows("acct")
    assert {r.state for r in rows.values()} == {"delivered"}
    for path in maildir_files(env.maildir):
        assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_delete_mode_empties_server_only_after_delivery(make_env: Any) -> None:
    messages = list(generate_messages(150, 1500, seed=4))
    env = make_env(messages, delete_after_days=0)
    report = env.poll()
    assert report.ok, report.error
    assert report.counts.deleted == 150
    assert len(env.store) == 0
    env.expect_exactly_once(messages)
    states = {r.state for r in env.ledger.rows("acct").values()}
    assert states == {"deleted"}
    # every DELE the server received was for a message already in the Maildir
    record = env.server.sessions[0]
    assert record.quit_received and len(record.deleted) == 150


def test_delete_after_days_waits(make_env: Any) -> None:
    env = make_env(delete_after_days=3)
    assert env.poll().ok
    assert len(env.store) == len(sample_messages())
    later = run_account(
        env.account,
        env.ledger,
        env.config.state_dir,
        now=lambda: time.time() + 4 * 86400,
    )
    assert later.ok and later.counts.deleted == len(sample_messages()) and len(env.store) == 0


def test_ignored_dele_is_repeated_without_refetch(make_env: Any) -> None:
    env = make_env(delete_after_days=0, faults=Faults(ignore_dele=True))
    assert env.poll().ok
    assert len(env.store) == len(sample_messages())  # server ignored the DELEs
    env.server.faults = Faults()
    second = env.poll()
    assert (
        second.ok and second.counts.fetched == 0 and second.counts.deleted == len(sample_messages())
    )
    assert len(env.store) == 0
    env.expect_exactly_once(sample_messages())


def test_lost_quit_reply_settled_by_next_listing(make_env: Any) -> None:
    env = make_env(delete_after_days=0, faults=Faults(drop_quit_reply=True))
    first = env.poll()
    assert not first.ok and first.temporary  # outcome of QUIT unknown: reported
    assert len(env.store) == 0  # the server did delete
    env.server.faults = Faults()
    second = env.poll()
    assert second.ok and second.counts.fetched == 0
    assert {r.state for r in env.ledger.rows("acct").values()} == {"deleted"}
    env.expect_exactly_once(sample_messages())


def test_quit_error_partial_removal(make_env: Any) -> None:
    env = make_env(delete_after_days=0, faults=Faults(quit_error=True))
    first = env.poll()
    assert not first.ok and "QUIT" in (first.error or "")
    remaining = len(env.store)
    assert 0 < remaining < len(sample_messages())
    env.server.faults = Faults()
    second = env.poll()
    assert second.ok and second.counts.fetched == 0 and second.counts.deleted == remaining
    assert len(env.store) == 0
    env.expect_exactly_once(sample_messages())


def test_drop_mid_retr_then_complete_exactly_once(make_env: Any) -> None:
    messages = list(generate_messages(40, 3000, seed=5))
    env = make_env(messages, delete_after_days=0, faults=Faults(drop_during_retr=(20, 500)))
    first = env.poll()
    assert not first.ok and first.temporary
    assert len(env.store) == 40  # no QUIT after a broken session: nothing deleted
    assert not any((env.maildir / "tmp").iterdir())
    env.server.faults = Faults()
    second = env.poll()
    assert second.ok, second.error
    env.expect_exactly_once(messages)
    assert len(env.store) == 0


def test_retr_error_on_one_message_others_still_fetched(make_env: Any) -> None:
    calls = {"n": 0}

    def hook(state: object, line: bytes) -> bytes | None:
        if line == b"RETR 2":
            calls["n"] += 1
            return b"-ERR [SYS/TEMP] message busy\r\n"
        return None

    env = make_env(server_kw={"on_command": hook})
    report = env.poll()
    assert not report.ok and report.temporary and "RETR 2" in (report.error or "")
    assert report.counts.fetched == len(sample_messages()) - 1
    env.server.on_command = None
    assert env.poll().counts.fetched == 1
    env.expect_exactly_once(sample_messages())


def test_max_message_size_skips_and_reports(make_env: Any) -> None:
    big = b"Subject: big\n\n" + b"x" * 70 + b"\n" * 1
    big = big + (b"y" * 76 + b"\n") * 200
    env = make_env([*sample_messages(), big], max_message_size=10_000)
    report = env.poll()
    assert report.ok and report.counts.skipped == 1
    assert any("skipped" in w for w in report.warnings)
    env.expect_exactly_once(sample_messages())
    assert len(env.store) == len(sample_messages()) + 1


def test_duplicate_uids_each_copy_once_none_deleted(make_env: Any) -> None:
    env = make_env([], delete_after_days=0)
    a, b = sample_messages()[:2]
    env.store.add(a, uid=b"same")
    env.store.add(b, uid=b"same")
    env.store.add(sample_messages()[2], uid=b"other")
    report = env.poll()
    assert report.ok and report.counts.fetched == 3
    assert [w for w in report.warnings if "more than one message" in w] == [
        "server lists 1 unique-id(s) for more than one message (same), against RFC 1939 §7: "
        "each copy is fetched once and none of them is ever deleted by popsync "
        "(see README, 'Duplicate unique-ids')"
    ]
    assert env.store.uids() == [b"same", b"same"]  # the ambiguous ones stay
    again = env.poll()
    assert again.counts.fetched == 0
    assert again.warnings == []  # said once, not on every poll
    env.expect_exactly_once([a, b, sample_messages()[2]])


def test_no_uidl_fails_with_explanation(make_env: Any) -> None:
    env = make_env(faults=Faults(no_uidl=True))
    report = env.poll()
    assert not report.ok and "UIDL" in (report.error or "")
    assert maildir_files(env.maildir) == []


@pytest.mark.parametrize("uid", [b"../x", b"a/b", b"..", b":2,S", b"x" * 70, b"%2e%2e%2f"])
def test_hostile_uids_never_shape_a_path(make_env: Any, uid: bytes) -> None:
    env = make_env([])
    env.store.add(sample_messages()[0], uid=uid)
    assert env.poll().ok
    files = maildir_files(env.maildir)
    assert len(files) == 1
    assert files[0].parent.parent == env.maildir
    assert uid.decode() not in files[0].name
    assert not (env.tmp / "x").exists()


def test_recovery_finds_file_moved_to_cur_with_flags(make_env: Any) -> None:
    """W3: linked into new/ (and moved by a reader), ledger still says fetching."""
    env = make_env()
    assert env.poll().ok
    rows = env.ledger.rows("acct")
    victim = next(iter(rows.values()))
    # Rewind the ledger to "fetching" as if the process died before the commit.
    with env.ledger.engine.begin() as conn:
        from sqlalchemy import text

        conn.execute(
            text(
                "UPDATE messages SET state='fetching', sha256=NULL, stored_size=NULL,"
                " delivered_at=NULL WHERE id=:i"
            ),
            {"i": victim.id},
        )
    new_path = env.maildir / "new" / victim.maildir_name
    new_path.rename(env.maildir / "cur" / f"{victim.maildir_name}:2,S")
    report = env.poll()
    assert report.ok and report.counts.fetched == 0
    env.expect_exactly_once(sample_messages())
    assert env.ledger.rows("acct")[victim.key].state == "delivered"


def test_lost_ledger_is_not_an_empty_mailbox(make_env: Any, tmp_path: Path) -> None:
    env = make_env(delete_after_days=None)
    assert env.poll().ok
    env.ledger.close()
    if env.config.ledger_url.startswith("sqlite"):
        for f in (tmp_path / "state").glob("ledger.db*"):
            f.unlink()
    else:
        engine = create_engine(env.config.ledger_url)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "DROP TABLE messages, polls, accounts, message_generations, alembic_version;"
                    "DROP FUNCTION popsync_bump_generation"
                )
            )
        engine.dispose()
    env.ledger = Ledger.open(env.config.ledger_url)
    report = env.poll()
    assert report.ok and report.counts.fetched == 0
    assert any("already delivered; not fetched again" in w for w in report.warnings)
    env.expect_exactly_once(sample_messages())


def test_disk_full_fails_poll_and_deletes_nothing(
    make_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = list(generate_messages(30, 2000, seed=8))
    env = make_env(messages, delete_after_days=0)
    real_write = os.write
    written = {"n": 0}

    def full_disk(fd: int, data: Any) -> int:
        written["n"] += 1
        if written["n"] > 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    report = env.poll()
    monkeypatch.undo()
    assert not report.ok and "No space left" in (report.error or "")
    assert len(env.store) == 30  # the session was dropped without QUIT
    assert not any((env.maildir / "tmp").iterdir())
    second = env.poll()
    assert second.ok, second.error
    env.expect_exactly_once(messages)
    assert len(env.store) == 0


def test_account_busy_when_locked(make_env: Any) -> None:
    env = make_env()
    with env.ledger.account_lock(env.config.state_dir, "acct", wait=False):
        report = env.poll()
    assert not report.ok and report.temporary
    assert maildir_files(env.maildir) == []


def test_auth_failure_is_permanent(make_env: Any) -> None:
    env = make_env(faults=Faults(errors={"PASS": b"-ERR [AUTH] invalid credentials"}), auth="user")
    report = env.poll()
    assert not report.ok and report.temporary is False
    assert "AUTH" in (report.error or "")


def test_server_text_escaped_in_report(make_env: Any) -> None:
    env = make_env(faults=Faults(errors={"PASS": b"-ERR [SYS/TEMP] \x1b[31mred\x07"}), auth="user")
    report = env.poll()
    assert report.error is not None and "\x1b" not in report.error and "\\x1b" in report.error


# -- the command line ------------------------------------------------------------------


def test_cli_sync_exit_codes(
    make_env: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    env = make_env()
    cfg = str(env.config_path)
    assert cli_main(["-c", cfg, "sync", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "acct:" in out and f"{len(sample_messages())} fetched" in out
    assert cli_main(["-c", cfg, "sync", "nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err
    env.server.faults = Faults(errors={"UIDL": b"-ERR [SYS/TEMP] later"})
    assert cli_main(["-c", cfg, "sync"]) == 1
    err = capsys.readouterr().err
    assert "acct" in err and "FAILED" in err and "Traceback" not in err
    assert cli_main(["-c", cfg, "check"]) == 0
    assert cli_main(["-c", str(tmp_path / "missing.yaml"), "check"]) == 2
    capsys.readouterr()
    assert cli_main(["-c", cfg, "status", "--json"]) == 1  # the last poll failed
    status = capsys.readouterr().out
    assert json.loads(status)["accounts"][0]["last_poll"]["result"] == "error"


def test_cli_one_failing_account_does_not_stop_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with POP3TestServer(MailStore(sample_messages())) as srv:
        cfg = write_config(
            tmp_path, [{"name": "down", "port": dead}, {"name": "up", "port": srv.port}]
        )
        assert cli_main(["-c", str(cfg), "sync"]) == 1
    captured = capsys.readouterr()
    assert "down" in captured.err and "up:" in captured.out
    assert len(maildir_files(tmp_path / "Maildir" / "up")) == len(sample_messages())


def test_password_command_with_injection_sends_nothing(tmp_path: Path) -> None:
    script = tmp_path / "pw.sh"
    script.write_text("#!/bin/sh\nprintf 'secret\\r\\nDELE 1\\n'\n")
    script.chmod(0o700)
    with POP3TestServer(MailStore(sample_messages())) as srv:
        cfg = write_config(
            tmp_path, [{"name": "a", "port": srv.port, "password_command": str(script)}]
        )
        # The config is valid; the secret it yields is not: that account's poll fails
        # (exit 1) before any connection is made.
        assert cli_main(["-c", str(cfg), "sync"]) == 1
        assert srv.sessions == []
    assert len(srv.store) == len(sample_messages())


def test_stop_request_finishes_in_flight_then_quits(make_env: Any) -> None:
    messages = list(generate_messages(60, 1500, seed=12))
    env = make_env(messages, delete_after_days=0)
    asked = {"n": 0}

    def should_stop() -> bool:
        asked["n"] += 1
        return asked["n"] > 10  # ten RETRs may start, then the stop request arrives

    report = run_account(env.account, env.ledger, env.config.state_dir, should_stop=should_stop)
    assert report.ok and report.interrupted
    assert report.counts.fetched == 10 and report.counts.deleted == 10
    assert len(env.store) == 50 and env.server.sessions[0].quit_received
    rest = env.poll()
    assert rest.ok and rest.counts.fetched == 50 and not rest.interrupted
    env.expect_exactly_once(messages)


def test_reused_uid_with_other_headers_is_not_deleted(make_env: Any) -> None:
    """RFC 1939 §7 only says a server *should* not reuse a unique-id."""
    env = make_env([], delete_after_days=3)
    original = b"Subject: first\nFrom: a@example.org\n\nbody\n"
    impostor = b"Subject: other\nFrom: a@example.org\n\nbody\n"  # same size, new headers
    env.store.add(original, uid=b"reused")
    env.store.add(sample_messages()[0], uid=b"honest")
    assert env.poll().ok
    env.store.remove(b"reused")
    env.store.add(impostor, uid=b"reused")
    later = run_account(
        env.account, env.ledger, env.config.state_dir, now=lambda: time.time() + 4 * 86400
    )
    assert later.ok and later.counts.deleted == 1
    # Same size, other headers: as likely a server that rewrites headers on
    # each download as a reused unique-id; neither deleted nor fetched again.
    assert [w for w in later.warnings if "header section differs" in w]
    assert env.store.uids() == [b"reused"]  # the impostor, never fetched, is still there
    rows = env.ledger.rows("acct")
    assert rows[(b"honest", 0)].state == "deleted"
    assert rows[(b"reused", 0)].withheld is not None
    quiet = run_account(
        env.account, env.ledger, env.config.state_dir, now=lambda: time.time() + 5 * 86400
    )
    assert quiet.ok and quiet.warnings == []  # reported once, not on every poll
    assert env.store.uids() == [b"reused"]


def test_list_only_when_sizes_matter(make_env: Any) -> None:
    env = make_env(list(generate_messages(80, 500, seed=21)))
    assert env.poll().counts.fetched == 80  # many new: one whole LIST
    assert env.poll().counts.fetched == 0  # nothing new: no LIST at all
    env.store.add(sample_messages()[0])
    assert env.poll().counts.fetched == 1  # one new: LIST n for it alone
    first, second, third = (s.commands for s in env.server.sessions)
    assert [line for line, _ in first if line.startswith(b"LIST")] == [b"LIST"]
    assert not any(line.startswith(b"LIST") for line, _ in second)
    assert [line for line, _ in third if line.startswith(b"LIST")] == [b"LIST 81"]


def test_status_says_when_an_account_needs_attention(
    make_env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    env = make_env(faults=Faults(errors={"PASS": b"-ERR [AUTH] invalid credentials"}), auth="user")
    cfg = str(env.config_path)
    assert cli_main(["-c", cfg, "sync"]) == 1
    capsys.readouterr()
    assert cli_main(["-c", cfg, "status"]) == 1
    assert "needs attention: retrying will not help" in capsys.readouterr().out
    env.server.faults = Faults()
    assert cli_main(["-c", cfg, "sync"]) == 0
    capsys.readouterr()
    assert cli_main(["-c", cfg, "status"]) == 0
    assert "needs attention" not in capsys.readouterr().out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_reported_per_batch_and_drawn_on_a_terminal(
    make_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from popsync.cli import _ProgressBar

    env = make_env(list(generate_messages(150, 800, seed=31)))
    seen: list[tuple[int, int, int]] = []
    report = run_account(
        env.account, env.ledger, env.config.state_dir, progress=lambda *a: seen.append(a)
    )
    assert report.ok and seen
    assert [done for done, _, _ in seen] == sorted(done for done, _, _ in seen)
    assert seen[-1][:2] == (150, 150) and seen[-1][2] == report.counts.bytes

    monkeypatch.setenv("TERM", "xterm")
    screen = _Terminal()
    bar = _ProgressBar("acct", screen)
    assert bar.enabled
    bar.update(3, 10, 100)  # a short poll draws nothing
    assert screen.getvalue() == ""
    bar.update(75, 150, 2_000_000)
    assert "acct: [###############...............] 75/150 2.0 MB" in screen.getvalue()
    bar.close()
    assert screen.getvalue().endswith("\r\x1b[K")  # the line is cleared for the summary
    assert not _ProgressBar("acct", io.StringIO()).enabled  # not a terminal: no bar
