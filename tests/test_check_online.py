"""``popsync check --online``: after the config check, log in to each account
(STAT, QUIT) with the real process against the project's test server; one
line per account, exit 1 if any failed, and nothing fetched, deleted or
recorded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import popsync, write_config

pytestmark = pytest.mark.timeout(60)


def test_online_check_logs_in_to_each_account_and_changes_nothing(tmp_path: Path) -> None:
    store = MailStore(generate_messages(3, 800, seed=9))
    with POP3TestServer(store) as srv:
        config = write_config(
            tmp_path,
            [
                {"name": "good", "port": srv.port},
                {"name": "bad", "port": srv.port, "secret": "wrong"},
            ],
        )
        offline = popsync("-c", str(config), "check")
        run = popsync("-c", str(config), "check", "--online")
        commands = {line.split(b" ")[0].upper() for s in srv.sessions for line, _ in s.commands}
    assert (offline.returncode, offline.stderr) == (0, "")
    assert len(srv.sessions) == 2  # the plain check connected nowhere
    assert run.returncode == 1
    out = run.stdout.splitlines()
    assert out[0].endswith("OK (2 account(s): good, bad)")
    assert out[1].startswith("good: ok (3 messages, ") and out[1].endswith("KB)"), out
    (line,) = run.stderr.splitlines()
    assert line.startswith("popsync: bad: FAILED: ") and "wrong" not in line, line
    assert commands.isdisjoint({b"RETR", b"DELE", b"TOP"}), commands
    assert len(store) == 3
    assert not (tmp_path / "state").exists()  # no ledger
    assert list((tmp_path / "Maildir").iterdir()) == []


def test_online_check_of_good_accounts_exits_0(tmp_path: Path) -> None:
    with POP3TestServer(MailStore()) as srv:
        config = write_config(tmp_path, [{"name": "empty", "port": srv.port}])
        run = popsync("-c", str(config), "check", "--online")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[1] == "empty: ok (0 messages, 0 B)"


def test_online_check_gives_the_tls_mode_hint(tmp_path: Path, ca_file: Path) -> None:
    with POP3TestServer(MailStore()) as srv:
        config = write_config(
            tmp_path,
            [{"name": "acct", "port": srv.port, "tls": "implicit", "ca_file": str(ca_file)}],
        )
        run = popsync("-c", str(config), "check", "--online")
    assert run.returncode == 1
    (line,) = run.stderr.splitlines()
    assert "speaks plain POP3: use tls: starttls" in line, line
