"""``popsync sync --refetch``: the messages delivered earlier whose Maildir file
is missing or damaged are fetched again -- exactly those, exactly once, and
only when the server still holds them unchanged.

Real sockets (the project's test server), real Maildirs, a real SQLite
ledger; the command line runs in-process, except where a real ``popsync``
process is SIGKILLed mid-refetch.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from popsync.cli import main as cli_main
from popsync.errors import LedgerError
from popsync.ledger import Ledger
from popsync.sync import run_account
from popsync.testing.faults import Faults
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import load, maildir_contents, maildir_files, stored_form, write_config
from tests.mbox_helpers import mbox_config

pytestmark = pytest.mark.timeout(120)

MESSAGES = list(generate_messages(5, 1800, seed=21))


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


Cli = Callable[..., Result]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """``popsync -c CONFIG ARGS`` in this process: (exit status, stdout, stderr)."""

    def run(config: Path, *args: str) -> Result:
        capsys.readouterr()
        code = cli_main(["-c", str(config), *args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def popsync(
    config: Path, *args: str, failpoint: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``popsync -c CONFIG ARGS`` in a child process, SIGKILLed at *failpoint*."""
    env = {k: v for k, v in os.environ.items() if k != "POPSYNC_FAILPOINT"}
    if failpoint:
        env["POPSYNC_FAILPOINT"] = failpoint
    return subprocess.run(
        [sys.executable, "-m", "popsync", "-c", str(config), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def retrieved(server: POP3TestServer) -> list[int]:
    """Message numbers RETRieved in the server's last session."""
    record = server.sessions[-1]
    return sorted(int(c.split()[1]) for c, _ in record.commands if c.startswith(b"RETR "))


def file_of(maildir: Path, data: bytes) -> Path:
    (path,) = [p for p in maildir_files(maildir) if p.read_bytes() == stored_form(data)]
    return path


def synced(tmp_path: Path, server: POP3TestServer) -> tuple[Path, Path]:
    """A config for one account on *server*, synced once; (config, Maildir)."""
    config = write_config(tmp_path, [{"name": "acct", "port": server.port}])
    loaded = load(config)
    account = loaded.accounts[0]
    assert account.maildir is not None
    maildir = account.maildir
    with Ledger.open(loaded.ledger_url) as ledger:
        first = run_account(account, ledger, loaded.state_dir)
        assert first.ok, first.error
    assert set(maildir_contents(maildir)) == {stored_form(m) for m in MESSAGES}
    return config, maildir


def assert_exactly_once(maildir: Path) -> None:
    contents = maildir_contents(maildir)
    assert set(contents) == {stored_form(m) for m in MESSAGES}
    assert all(n == 1 for n in contents.values()), "a message was delivered twice"


def test_two_deleted_files_come_back_byte_identical_and_only_they(tmp_path: Path, cli: Cli) -> None:
    with POP3TestServer(MailStore(MESSAGES)) as server:
        config, maildir = synced(tmp_path, server)
        # the reader has read one of the others: moved to cur/ with flags
        kept = file_of(maildir, MESSAGES[0])
        kept.rename(maildir / "cur" / (kept.name + ":2,S"))
        for data in (MESSAGES[1], MESSAGES[3]):
            file_of(maildir, data).unlink()
        untouched = {p: p.stat().st_mtime_ns for p in maildir_files(maildir)}

        plain = cli(config, "sync", "--no-progress")
        assert plain.returncode == 0 and " 0 fetched" in plain.stdout  # the ledger says delivered

        run = cli(config, "sync", "--no-progress", "--refetch")
        assert run.returncode == 0, run.stderr
        assert " 0 new, 2 fetched" in run.stdout and " 2 refetched" in run.stdout, run.stdout
        assert retrieved(server) == [2, 4]
        assert_exactly_once(maildir)
        assert all(p.stat().st_mtime_ns == t for p, t in untouched.items())

        again = cli(config, "sync", "--no-progress", "--refetch")
        assert again.returncode == 0, again.stderr
        assert " 0 fetched" in again.stdout and " 0 refetched" in again.stdout
        assert retrieved(server) == []
        assert_exactly_once(maildir)
        check = cli(config, "verify")
        assert check.returncode == 0, check.stdout + check.stderr


def test_a_damaged_copy_is_fetched_again_beside_the_damaged_file(tmp_path: Path, cli: Cli) -> None:
    with POP3TestServer(MailStore(MESSAGES)) as server:
        config, maildir = synced(tmp_path, server)
        damaged = file_of(maildir, MESSAGES[2])
        damaged.write_bytes(stored_form(MESSAGES[2])[:300])  # a truncating disk

        run = cli(config, "sync", "--no-progress", "--refetch")
        assert run.returncode == 0, run.stderr
        assert " 1 refetched" in run.stdout
        assert damaged.name in run.stderr and "damaged file is left as it is" in run.stderr
        assert damaged.read_bytes() == stored_form(MESSAGES[2])[:300]  # left as it was
        contents = maildir_contents(maildir)
        assert all(contents[stored_form(m)] == 1 for m in MESSAGES)
        assert len(maildir_files(maildir)) == len(MESSAGES) + 1
        assert cli(config, "verify").returncode == 0  # the ledger names the new copy


def test_a_message_gone_from_the_server_is_reported_not_retried(tmp_path: Path, cli: Cli) -> None:
    store = MailStore(MESSAGES)
    with POP3TestServer(store) as server:
        config, maildir = synced(tmp_path, server)
        gone_uid = store.uids()[1]
        file_of(maildir, MESSAGES[1]).unlink()
        file_of(maildir, MESSAGES[4]).unlink()
        store.remove(gone_uid)
        for _ in range(2):  # the same answer each time, never an error
            run = cli(config, "sync", "--no-progress", "--refetch")
            assert run.returncode == 0, run.stderr
            assert " 1 refetched" in run.stdout or " 0 refetched" in run.stdout
            line = next(x for x in run.stderr.splitlines() if "no longer on the server" in x)
            assert "1 lost copy(ies) not refetched" in line and gone_uid.decode() in line
            assert "Traceback" not in run.stderr
        rows = Ledger.open(load(config).ledger_url)
        try:
            assert rows.rows("acct")[(gone_uid, 0)].state == "delivered"
        finally:
            rows.close()
    contents = maildir_contents(maildir)
    assert stored_form(MESSAGES[1]) not in contents and contents[stored_form(MESSAGES[4])] == 1


def test_no_refetch_when_the_server_cannot_show_it_is_the_same_message(
    tmp_path: Path, cli: Cli
) -> None:
    faults = Faults(errors={"TOP": b"-ERR TOP is not available"})
    with POP3TestServer(MailStore(MESSAGES), faults=faults) as server:
        config, maildir = synced(tmp_path, server)
        file_of(maildir, MESSAGES[0]).unlink()
        run = cli(config, "sync", "--no-progress", "--refetch")
        assert run.returncode == 0, run.stderr
        assert " 0 refetched" in run.stdout
        assert "not refetched" in run.stderr and "refused TOP" in run.stderr
        assert retrieved(server) == []
    assert stored_form(MESSAGES[0]) not in maildir_contents(maildir)


def test_a_reused_unique_id_is_not_refetched(tmp_path: Path, cli: Cli) -> None:
    store = MailStore(MESSAGES)
    with POP3TestServer(store) as server:
        config, maildir = synced(tmp_path, server)
        file_of(maildir, MESSAGES[0]).unlink()
        other = b"Subject: someone else's\nFrom: x@example.org\n\n" + b"z" * 5000 + b"\n"
        store.rewrite(store.messages()[0], other)  # same unique-id, another message
        run = cli(config, "sync", "--no-progress", "--refetch")
        assert run.returncode == 0, run.stderr
        assert " 0 refetched" in run.stdout and "now names another message" in run.stderr
    assert stored_form(other) not in maildir_contents(maildir)


def test_refetch_needs_a_maildir_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with POP3TestServer(MailStore(MESSAGES)) as server:
        config = mbox_config(
            tmp_path,
            [
                {"name": "box", "port": server.port},
                {"name": "mb", "port": server.port, "mbox": str(tmp_path / "inbox")},
            ],
        )
        assert cli_main(["-c", str(config), "sync", "--refetch", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [
            "popsync: mb: --refetch needs a maildir target (it delivers to mbox)"
        ]
        assert server.sessions == []  # refused before any account was polled
        assert cli_main(["-c", str(config), "sync", "--refetch", "--no-progress", "box"]) == 0


# -- crashes: killed mid-refetch, a re-run delivers each lost copy exactly once ------------


# after_reopen: rows reopened, nothing fetched; after_link / after_dir_fsync:
# the new copies are in new/, the ledger does not know yet.  The re-run is a
# plain sync or another --refetch: either finishes the refetch, once.
@pytest.mark.crash
@pytest.mark.slow
@pytest.mark.parametrize(
    ("failpoint", "rerun"),
    [
        ("after_reopen", ["sync"]),
        ("after_reopen", ["sync", "--refetch"]),
        ("after_link", ["sync"]),
        ("after_dir_fsync", ["sync", "--refetch"]),
    ],
)
def test_sigkill_mid_refetch_then_rerun_exactly_once(
    tmp_path: Path, failpoint: str, rerun: list[str]
) -> None:
    with POP3TestServer(MailStore(MESSAGES)) as server:
        config, maildir = synced(tmp_path, server)
        for data in MESSAGES[1:4]:
            file_of(maildir, data).unlink()
        crashed = popsync(config, "sync", "--no-progress", "--refetch", failpoint=failpoint)
        assert crashed.returncode == -signal.SIGKILL, (crashed.returncode, crashed.stderr)
        assert all(n == 1 for n in maildir_contents(maildir).values())

        clean = popsync(config, *rerun, "--no-progress")
        assert clean.returncode == 0, clean.stderr
        fetched = int(re.search(r" (\d+) fetched", clean.stdout).group(1))  # type: ignore[union-attr]
        assert fetched == (3 if failpoint == "after_reopen" else 0)
        assert_exactly_once(maildir)
        assert not any((maildir / "tmp").iterdir())
        check = popsync(config, "verify")
        assert check.returncode == 0, check.stdout + check.stderr


# -- the ledger transition ----------------------------------------------------------------


def test_reopen_moves_only_a_delivered_row_under_its_recorded_name(tmp_path: Path) -> None:
    with POP3TestServer(MailStore(MESSAGES)) as server:
        config, _ = synced(tmp_path, server)
    with Ledger.open(load(config).ledger_url) as ledger:
        first, second, *_ = sorted(ledger.rows("acct").values(), key=lambda r: r.id)
        assert first.maildir_name is not None and second.maildir_name is not None
        with pytest.raises(LedgerError, match="expected delivered"):
            ledger.reopen("acct", [(first.key, "1.Pwrong.host", "2.Pnew.host")], 5.0)
        with pytest.raises(LedgerError, match="taken"):
            ledger.reopen("acct", [(first.key, first.maildir_name, second.maildir_name)], 5.0)
        ledger.reopen("acct", [(first.key, first.maildir_name, "9.Pfresh.host")], 5.0)
        row = ledger.rows("acct")[first.key]
        assert (row.state, row.maildir_name, row.sha256, row.delivered_at) == (
            "fetching",
            "9.Pfresh.host",
            None,
            None,
        )
        with pytest.raises(LedgerError, match="state fetching"):
            ledger.reopen("acct", [(first.key, "9.Pfresh.host", "10.Pother.host")], 6.0)


def test_a_top_past_its_size_is_not_refetched_and_the_rest_is(tmp_path: Path, cli: Cli) -> None:
    filler = b"".join(b"X-Filler-%04d: %s\n" % (i, b"f" * 90) for i in range(800))  # ~85 KB
    tall = b"Subject: tall headers\n" + filler + b"\nbody\n"
    store = MailStore([tall, *MESSAGES[:2]])
    with POP3TestServer(store) as server:
        config = write_config(tmp_path, [{"name": "acct", "port": server.port}])
        assert cli(config, "sync", "--no-progress").returncode == 0
    maildir = load(config).accounts[0].maildir
    assert maildir is not None
    file_of(maildir, tall).unlink()
    file_of(maildir, MESSAGES[0]).unlink()
    # The server now says message 1 is 100 octets: its ~85 KB TOP runs past
    # the bound that size allows, so the session ends; the poll goes on in a
    # fresh one without it.
    with POP3TestServer(store, faults=Faults(wrong_list_size={1: 100})) as liar:
        config = write_config(tmp_path, [{"name": "acct", "port": liar.port}])
        run = cli(config, "sync", "--no-progress", "--refetch")
    assert run.returncode == 0, run.stderr
    assert " 1 refetched" in run.stdout, run.stdout
    assert "its TOP ran past the size the server announced" in run.stderr
    contents = maildir_contents(maildir)
    assert contents[stored_form(MESSAGES[0])] == 1 and stored_form(tall) not in contents
