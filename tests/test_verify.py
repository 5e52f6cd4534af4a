"""``popsync verify`` through the real CLI (a child process) against the
project's test server and a real Dovecot, with a real ledger and Maildir.

Each test syncs first (in process, the ordinary poll), then changes one thing
-- a local file, the server's mailbox -- and checks what verify says, its
exit status, and that its session sent no RETR and no DELE.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popsync import verify
from popsync.config import Config
from popsync.ledger import Ledger
from popsync.sync import run_account
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import load, maildir_files, write_config
from tests.servers.dovecot import Mailbox

pytestmark = pytest.mark.timeout(120)

MESSAGES = list(generate_messages(6, 1500, seed=11))


class Env:
    """One account on one test server, synced once."""

    def __init__(
        self, tmp: Path, server: POP3TestServer, ledger_url: str | None = None, **account: Any
    ) -> None:
        self.server = server
        self.store = server.store
        self.config_path = write_config(
            tmp, [{"name": "acct", "port": server.port, **account}], ledger_url=ledger_url
        )
        self.config: Config = load(self.config_path)
        self.account = self.config.accounts[0]
        self.maildir = self.account.maildir

    def sync(self) -> None:
        ledger = Ledger.open(self.config.ledger_url)
        try:
            report = run_account(self.account, ledger, self.config.state_dir)
        finally:
            ledger.close()
        assert report.ok, report.error

    def verify(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``popsync -c CONFIG verify ARGS`` in a child process."""
        return self.popsync("verify", *args)

    def popsync(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``popsync -c CONFIG ARGS`` in a child process."""
        return subprocess.run(
            [sys.executable, "-m", "popsync", "-c", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def verify_json(self, *args: str) -> tuple[int, dict[str, Any]]:
        done = self.verify("--json", *args)
        doc: dict[str, Any] = json.loads(done.stdout)
        return done.returncode, doc["accounts"][0]

    def files(self) -> list[Path]:
        return maildir_files(self.maildir)

    def last_session_commands(self) -> list[str]:
        record = self.server.wait_for_sessions(len(self.server.sessions))[-1]
        return record.command_names()


@pytest.fixture
def env(tmp_path: Path, ledger_url: str) -> Iterator[Env]:
    """Synced once, on each backend in turn."""
    server = POP3TestServer(MailStore(MESSAGES)).start()
    try:
        made = Env(tmp_path, server, ledger_url)
        made.sync()
        yield made
    finally:
        server.stop()


def _read_only(commands: list[str]) -> None:
    assert "RETR" not in commands and "DELE" not in commands, commands
    assert {"UIDL", "LIST"} <= set(commands) and commands[-1] == "QUIT", commands


def test_all_held_exits_0_and_sends_no_retr_or_dele(env: Env) -> None:
    done = env.verify()
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["acct: 6 on server: 6 held"]
    assert done.stderr == ""
    _read_only(env.last_session_commands())
    assert len(env.store) == 6


def test_a_deleted_local_file_is_missing(env: Env) -> None:
    gone = env.files()[2]
    gone.unlink()
    done = env.verify()
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "acct: 6 on server: 5 held, 1 missing"
    assert len(lines) == 2 and lines[1].startswith("acct: missing: unique-id ")
    assert gone.name.split(":")[0] in lines[1]  # names the file
    _read_only(env.last_session_commands())


def test_a_corrupted_file_is_damaged(env: Env) -> None:
    victim = env.files()[0]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x20  # same size, other bytes
    victim.write_bytes(bytes(data))
    code, doc = env.verify_json()
    assert code == 1
    assert doc["counts"] == {"held": 5, "damaged": 1}
    [problem] = doc["problems"]
    assert problem["state"] == "damaged" and victim.name.split(":")[0] in problem["detail"]


def test_a_new_message_on_the_server_was_never_fetched(env: Env) -> None:
    uid = env.store.add(b"Subject: late\r\n\r\narrived after the poll\r\n")
    done = env.verify()
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "acct: 7 on server: 6 held, 1 never fetched",
        f"acct: never fetched: unique-id {uid.decode()} (message 7): "
        "new since the last poll: not in the ledger",
    ]


def test_a_skipped_message_is_not_held(tmp_path: Path) -> None:
    big = b"Subject: big\r\n\r\n" + b"x" * 5000 + b"\r\n"
    server = POP3TestServer(MailStore([*MESSAGES[:2], big])).start()
    try:
        env = Env(tmp_path, server, max_message_size=4000)
        env.sync()
        code, doc = env.verify_json()
    finally:
        server.stop()
    assert code == 1
    assert doc["counts"] == {"held": 2, "skipped": 1}
    [problem] = doc["problems"]
    assert problem["state"] == "skipped" and problem["msg"] == 3
    assert "max_message_size" in problem["detail"]


def test_json_lists_every_problem_for_a_script(env: Env) -> None:
    env.files()[0].unlink()
    uid = env.store.add(b"Subject: late\r\n\r\nnew\r\n")
    code, doc = env.verify_json()
    assert code == 1
    assert doc["account"] == "acct" and doc["ok"] is False and doc["error"] is None
    assert doc["on_server"] == 7
    assert doc["counts"] == {"held": 5, "missing": 1, "never fetched": 1}
    states = {p["state"]: p for p in doc["problems"]}
    assert set(states) == {"missing", "never fetched"}
    assert states["never fetched"]["uid"] == uid.decode()
    assert bytes.fromhex(states["never fetched"]["uid_hex"]) == uid
    assert states["missing"]["receipt"]  # the file name the ledger recorded


def test_deep_catches_a_reused_unique_id(env: Env) -> None:
    """The server drops a message and gives its unique-id to another one of
    another size: the listing alone cannot tell, TOP n 0 can."""
    old = env.store.messages()[3]
    env.store.remove(old.uid)
    env.store.add(b"Subject: impostor\r\nFrom: x@example.org\r\n\r\nother\r\n", uid=old.uid)
    assert env.verify().returncode == 0  # same unique-id, and the copy of it is intact
    code, doc = env.verify_json("--deep")
    assert code == 1
    [problem] = doc["problems"]
    assert problem["state"] == "reused" and problem["uid"] == old.uid.decode()
    commands = env.last_session_commands()
    _read_only(commands)
    assert commands.count("TOP") == 6


def test_unknown_account_is_a_usage_error(env: Env) -> None:
    done = env.verify("nosuch")
    assert done.returncode == 2
    assert "unknown account 'nosuch'" in done.stderr and "Traceback" not in done.stderr


def test_an_unreachable_server_is_one_line_and_exit_1(env: Env) -> None:
    env.server.stop()
    done = env.verify()
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("popsync: acct: cannot verify: ")


def test_mda_copies_are_held_per_the_ledger(tmp_path: Path) -> None:
    out = tmp_path / "delivered"
    out.mkdir()
    script = tmp_path / "mda.sh"
    script.write_text(f'#!/bin/sh\ncat > "{out}/$$.eml"\n')
    script.chmod(0o700)
    server = POP3TestServer(MailStore(MESSAGES[:3])).start()
    try:
        env = Env(tmp_path, server, maildir=None, mda=str(script))
        env.sync()
        done = env.verify()
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "acct: 3 on server: 3 held (per the ledger) "
        "(mda copies are not re-read: held per the ledger's receipts)"
    ]


@pytest.mark.dovecot
def test_dovecot_held_then_missing(
    tmp_path: Path, dovecot_mailbox: Mailbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    mailbox = dovecot_mailbox
    mailbox.add_messages(MESSAGES[:4])
    config_path = write_config(
        tmp_path,
        [
            {
                "name": "dove",
                "port": mailbox.pop3_port,
                "username": mailbox.user,
                "secret": mailbox.password,
            }
        ],
    )
    config = load(config_path)
    ledger = Ledger.open(config.ledger_url)
    try:
        assert run_account(config.accounts[0], ledger, config.state_dir).ok
    finally:
        ledger.close()

    def verify() -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "popsync", "-c", str(config_path), "verify"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    held = verify()
    assert held.returncode == 0, held.stderr
    assert held.stdout.splitlines() == ["dove: 4 on server: 4 held"]
    os.unlink(maildir_files(config.accounts[0].maildir)[1])
    missing = verify()
    assert missing.returncode == 1
    assert missing.stdout.splitlines()[0] == "dove: 4 on server: 3 held, 1 missing"
    assert len(mailbox.stored_messages()) == 4  # verify deleted nothing


def test_an_imported_message_counts_as_held(env: Env, tmp_path: Path) -> None:
    """A unique-id adopted from fetchmail's state by ``popsync import`` (known,
    no copy popsync made) is reported as imported, not missing."""
    uid = env.store.add(b"Subject: fetched by fetchmail\r\n\r\nlong ago\r\n")
    fetchids = tmp_path / ".fetchids"
    fetchids.write_bytes(b"user@127.0.0.1 " + uid + b"\n")
    imported = env.popsync("import", "acct", "--from", "fetchmail", str(fetchids))
    assert imported.returncode == 0, imported.stderr
    code, doc = env.verify_json()
    assert code == 0, doc
    assert doc["counts"] == {"held": 6, "imported": 1} and doc["problems"] == []


def test_a_poll_in_progress_is_one_line_not_a_wrong_answer(env: Env) -> None:
    sessions = len(env.server.sessions)
    with (
        Ledger.open(env.config.ledger_url) as ledger,
        ledger.account_lock(env.config.state_dir, "acct", wait=False),
    ):
        done = env.verify()
    assert len(env.server.sessions) == sessions  # it did not even connect
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    # On PostgreSQL the holder's host is named too.
    assert line.startswith(f"popsync: acct: cannot verify: account acct: process {os.getpid()} ")
    assert line.endswith(" is polling it already"), line


def test_deep_says_when_the_server_refuses_top(tmp_path: Path) -> None:
    server = POP3TestServer(MailStore(MESSAGES[:2]), top=False).start()
    try:
        env = Env(tmp_path, server)
        env.sync()
        sessions = len(server.sessions)
        done = env.verify("--deep")
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "acct: 2 on server: 2 held (the server refused TOP for 2 message(s): "
        "their headers were not compared)"
    ]
    assert len(server.sessions) == sessions + 1


def test_a_vanished_maildir_makes_every_copy_missing(env: Env) -> None:
    assert env.maildir is not None
    shutil.rmtree(env.maildir)
    code, doc = env.verify_json()
    assert code == 1
    assert doc["counts"] == {"missing": 6} and len(doc["problems"]) == 6
    assert not env.maildir.exists()  # verify creates nothing


def test_copies_are_looked_up_in_chunks(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, with chunks of two: every copy is still found and judged."""
    monkeypatch.setattr(verify, "FIND_CHUNK", 2)
    env.files()[4].unlink()
    ledger = Ledger.open(env.config.ledger_url)
    try:
        check = verify.verify_account(env.account, ledger, env.config.state_dir, deep=True)
    finally:
        ledger.close()
    assert check.error is None
    assert check.counts == {verify.State.HELD: 5, verify.State.MISSING: 1}
