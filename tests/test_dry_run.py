"""``popsync sync --dry-run``: the real process against the project's test
server.  It prints what a poll would fetch, skip, delete and remap, and
changes nothing: the server's command log shows no RETR and no DELE, the
ledger file's bytes and rows are as before (no poll row either), and no
Maildir is created.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from popsync.testing.faults import Faults
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import popsync, write_config

pytestmark = pytest.mark.timeout(60)


def commands_of(server: POP3TestServer) -> list[bytes]:
    return [line.split(b" ")[0].upper() for s in server.sessions for line, _ in s.commands]


def ledger_state(path: Path) -> tuple[str, list[tuple[object, ...]], list[tuple[object, ...]]]:
    """The ledger file's SHA-256, its message rows and its poll rows."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        messages = db.execute("SELECT * FROM messages ORDER BY id").fetchall()
        polls = db.execute("SELECT * FROM polls ORDER BY id").fetchall()
    return digest, messages, polls


def test_dry_run_without_a_ledger_creates_nothing(tmp_path: Path) -> None:
    store = MailStore(generate_messages(3, 800, seed=21))
    with POP3TestServer(store) as srv:
        config = write_config(
            tmp_path, [{"name": "acct", "port": srv.port, "delete_after_days": 0}]
        )
        run = popsync("-c", str(config), "sync", "--dry-run")
        sent = commands_of(srv)
    assert run.returncode == 0, run.stderr
    size = sum(m.size for m in store.messages())
    (line,) = run.stdout.splitlines()
    assert line.startswith("acct: dry run: fetch 3 (") and "skip 0, delete 3, remap 0" in line
    assert f"{size / 1000:.1f} KB" in line, (line, size)
    assert b"RETR" not in sent and b"DELE" not in sent and b"QUIT" in sent
    assert len(store) == 3
    assert not (tmp_path / "state").exists()
    assert list((tmp_path / "Maildir").iterdir()) == []


def test_dry_run_after_a_sync_leaves_the_ledger_unchanged(tmp_path: Path) -> None:
    messages = generate_messages(3, 800, seed=22)
    store = MailStore(messages)
    with POP3TestServer(store) as srv:
        # First a real poll that keeps the mail (delete_after_days is added below).
        keep = write_config(tmp_path, [{"name": "acct", "port": srv.port}])
        assert popsync("-c", str(keep), "sync", "--no-progress").returncode == 0
        config = write_config(
            tmp_path,
            [{"name": "acct", "port": srv.port, "delete_after_days": 0, "max_message_size": 1000}],
        )
        store.add(b"Subject: big\n\n" + b"x" * 5000 + b"\n")
        store.add(b"Subject: small\n\nnew\n")
        ledger = tmp_path / "state" / "ledger.db"
        before = ledger_state(ledger)
        maildir_before = sorted(p.name for p in (tmp_path / "Maildir" / "acct").rglob("*"))
        sessions_before = len(srv.sessions)
        run = popsync("-c", str(config), "--log-format", "json", "sync", "--dry-run", "acct")
        sent = [
            line.split(b" ")[0].upper()
            for s in srv.sessions[sessions_before:]
            for line, _ in s.commands
        ]
    assert run.returncode == 0, run.stderr
    (entry,) = [json.loads(x) for x in run.stdout.splitlines()]
    assert entry["account"] == "acct" and entry["result"] == "dry-run"
    assert (entry["new"], entry["skipped"], entry["deleted"], entry["remapped"]) == (1, 1, 4, 0)
    assert "skip 1 (larger than max_message_size" in entry["message"], entry["message"]
    assert b"RETR" not in sent and b"DELE" not in sent
    assert ledger_state(ledger) == before
    assert sorted(p.name for p in (tmp_path / "Maildir" / "acct").rglob("*")) == maildir_before
    assert len(store) == 5


def test_dry_run_counts_renumbered_mail_as_remapped_and_records_nothing(tmp_path: Path) -> None:
    store = MailStore(generate_messages(3, 800, seed=23))
    with POP3TestServer(store, faults=Faults(changing_uids=True)) as srv:
        config = write_config(tmp_path, [{"name": "acct", "port": srv.port}])
        assert popsync("-c", str(config), "sync", "--no-progress").returncode == 0
        ledger = tmp_path / "state" / "ledger.db"
        before = ledger_state(ledger)
        run = popsync("-c", str(config), "sync", "--dry-run")
        again = popsync("-c", str(config), "sync", "--dry-run")
        sent = commands_of(srv)
    assert run.returncode == 0, run.stderr
    assert "fetch 0 (0 B), skip 0, delete 0, remap 3" in run.stdout, run.stdout
    assert "remap 3" in again.stdout  # nothing was recorded the first time
    assert ledger_state(ledger) == before
    assert sent.count(b"RETR") == 3  # the real sync's only


def test_dry_run_failure_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with POP3TestServer(
        MailStore(), faults=Faults(errors={"UIDL": b"-ERR [SYS/TEMP] busy"})
    ) as srv:
        config = write_config(tmp_path, [{"name": "acct", "port": srv.port}])
        run = popsync("-c", str(config), "sync", "--dry-run")
    assert run.returncode == 1
    (line,) = run.stderr.splitlines()
    assert line.startswith("popsync: acct: FAILED: ") and "busy" in line, line
    assert not (tmp_path / "state").exists()


def test_dry_run_of_an_unknown_account_is_a_usage_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"name": "acct", "port": 1}])
    run = popsync("-c", str(config), "sync", "--dry-run", "nosuch")
    assert run.returncode == 2 and "nosuch" in run.stderr
