"""Several popsync processes sharing one PostgreSQL ledger: starting together,
locking accounts against each other, and what ``check`` says about targets.

Real ``popsync`` processes (``sys.executable -m popsync``) against the
project's POP3 test server and the private PostgreSQL the tests start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from popsync.config import load_config
from popsync.errors import LedgerError
from popsync.ledger import FetchIntent, Ledger
from popsync.locks import AccountBusy
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import maildir_contents, write_config
from tests.servers.postgres import PostgresCluster

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


def popsync_process(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "popsync", "-c", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=dict(os.environ),
    )


@pytest.fixture
def server() -> Iterator[POP3TestServer]:
    with POP3TestServer(MailStore(generate_messages(3, 800, seed=7))) as srv:
        yield srv


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(2))
def test_six_workers_starting_together_on_an_empty_database_all_succeed(
    tmp_path: Path, server: POP3TestServer, postgres: PostgresCluster, round_: int
) -> None:
    """Each first start checks the schema, finds none and creates it; only one may."""
    name = postgres.new_database("race")
    try:
        config = write_config(
            tmp_path, [{"name": "acct", "port": server.port}], ledger_url=postgres.url(name)
        )
        procs = [popsync_process(config, "sync", "--no-progress") for _ in range(6)]
        outputs = [p.communicate(timeout=90) for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, outputs
        # One of them fetched (the others found the account busy, or nothing new).
        assert sum(maildir_contents(tmp_path / "Maildir" / "acct").values()) == 3
    finally:
        postgres.drop_database(name)


# -- the account lock ------------------------------------------------------------

# A child that opens the ledger, takes an account's lock through it, says so,
# and holds it until told to go or killed. argv: ledger_url state_dir account
HOLDER = """
import sys
from pathlib import Path
from popsync.ledger import Ledger
with Ledger.open(sys.argv[1]) as ledger:
    with ledger.account_lock(Path(sys.argv[2]), sys.argv[3], wait=False):
        print("locked", flush=True)
        sys.stdin.readline()
"""


def start_holder(ledger_url: str, state_dir: Path, account: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, ledger_url, str(state_dir), account],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_the_lock_excludes_other_ledgers_and_names_the_holder(
    postgres_url: str, tmp_path: Path
) -> None:
    with Ledger.open(postgres_url) as first, Ledger.open(postgres_url) as second:
        with first.account_lock(tmp_path, "home", wait=False):
            with (
                pytest.raises(AccountBusy) as info,
                second.account_lock(tmp_path, "home", wait=False),
            ):
                pass
            assert (info.value.holder, info.value.host) == (os.getpid(), socket.gethostname())
            assert str(info.value) == (
                f"account home: process {os.getpid()} on {socket.gethostname()} "
                "is polling it already"
            )
            with second.account_lock(tmp_path, "work", wait=False):  # another account: free
                pass
            started = time.monotonic()
            with pytest.raises(AccountBusy), second.account_lock(tmp_path, "home", wait=0.3):
                pass
            assert time.monotonic() - started >= 0.3
        with second.account_lock(tmp_path, "home", wait=False):  # released with the block
            pass
    # Not a lock file in sight: on PostgreSQL the lock lives in the database.
    assert not (tmp_path / "locks").exists()


def test_a_waiter_gets_the_lock_when_the_holder_lets_go(postgres_url: str, tmp_path: Path) -> None:
    holder = start_holder(postgres_url, tmp_path, "home")
    try:
        with Ledger.open(postgres_url) as ledger:
            got = threading.Event()

            def wait_for_it() -> None:
                with ledger.account_lock(tmp_path, "home", wait=30.0):
                    got.set()

            th = threading.Thread(target=wait_for_it)
            th.start()
            assert not got.wait(0.3)
            assert holder.stdin is not None
            holder.stdin.write("go\n")
            holder.stdin.flush()
            assert got.wait(30)
            th.join(30)
    finally:
        holder.kill()
        holder.wait(30)


def test_a_killed_holders_lock_is_free_at_once(postgres_url: str, tmp_path: Path) -> None:
    holder = start_holder(postgres_url, tmp_path, "home")
    with Ledger.open(postgres_url) as ledger:
        with (
            pytest.raises(AccountBusy, match=f"process {holder.pid} on "),
            ledger.account_lock(tmp_path, "home", wait=False),
        ):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        # The server ends the dead client's session as soon as its socket
        # closes; a bounded wait covers a loaded machine.
        started = time.monotonic()
        with ledger.account_lock(tmp_path, "home", wait=5.0):
            waited = time.monotonic() - started
    assert waited < 5.0


def test_a_poll_whose_lock_was_lost_stops_at_its_next_write(
    postgres: PostgresCluster, postgres_url: str, tmp_path: Path
) -> None:
    """The server ended the lock's connection (a restart, a network cut) while the
    poll went on: its next write refuses, since another worker may now poll."""
    with Ledger.open(postgres_url) as ledger:
        with ledger.account_lock(tmp_path, "home", wait=False):
            ledger.begin_fetch("home", [FetchIntent(b"u1", 0, 10, "n1", 1.0)])
            ended = postgres.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE application_name = 'popsync {os.getpid()}@{socket.gethostname()}'"
            )
            assert ended == [(True,)]
            with pytest.raises(LedgerError, match="account home: its lock in the ledger") as info:
                ledger.begin_fetch("home", [FetchIntent(b"u2", 0, 10, "n2", 1.0)])
            assert info.value.temporary is True
            assert set(ledger.rows("home")) == {(b"u1", 0)}  # reads still work
        # Outside the lock (another thread, a later poll), writes are not checked.
        ledger.begin_fetch("home", [FetchIntent(b"u2", 0, 10, "n2", 1.0)])


def test_sync_of_an_account_another_worker_is_polling_says_busy_and_exits_0(
    ledger_url: str, tmp_path: Path, server: POP3TestServer
) -> None:
    """As with SQLite's lock file: one line, exit status 0, nothing fetched. On
    PostgreSQL the holder has a state directory of its own, as a worker on
    another host would: the lock is in the database."""
    config = write_config(tmp_path, [{"name": "acct", "port": server.port}], ledger_url=ledger_url)
    Ledger.open(ledger_url).close()  # so the holder does not race the sync to create it
    state_dir = load_config(config).state_dir
    if not ledger_url.startswith("sqlite"):
        state_dir = tmp_path / "another-host"
    holder = start_holder(ledger_url, state_dir, "acct")
    try:
        busy = popsync_process(config, "sync", "--no-progress")
        out, err = busy.communicate(timeout=60)
    finally:
        holder.kill()
        holder.wait(30)
    assert busy.returncode == 0, err
    (line,) = (out + err).splitlines()
    assert line.startswith(f"account acct: process {holder.pid} "), line
    assert line.endswith("is polling it already: skipped, its mail is being fetched"), line
    assert maildir_contents(tmp_path / "Maildir" / "acct") == {}
    ok = popsync_process(config, "sync", "--no-progress")
    ok.communicate(timeout=60)
    assert ok.returncode == 0
    assert sum(maildir_contents(tmp_path / "Maildir" / "acct").values()) == 3


# -- check -------------------------------------------------------------------------


def test_check_warns_about_local_targets_on_a_postgresql_ledger(tmp_path: Path) -> None:
    accounts = [
        {"name": "files", "port": 110},
        {"name": "box", "port": 110, "maildir": None, "mbox": str(tmp_path / "inbox.mbox")},
        {
            "name": "served",
            "port": 110,
            "maildir": None,
            "lmtp": "127.0.0.1:24",
            "lmtp_recipient": "rcpt@example.org",
        },
    ]
    # check does not connect: the URL is enough.
    url = "postgresql+psycopg://popsync:hunter2@127.0.0.1:1/popsync"
    shared = write_config(tmp_path, accounts, ledger_url=url)
    result = subprocess.run(
        [sys.executable, "-m", "popsync", "-c", str(shared), "check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{shared}: OK (3 account(s)")
    (line,) = result.stderr.splitlines()
    assert "accounts files (maildir), box (mbox) on a PostgreSQL ledger" in line, line
    assert line.endswith(
        "a Maildir local to one worker would split the mailbox; "
        "use lmtp or imap when several workers share the ledger"
    ), line
    assert "served" not in line and "hunter2" not in line

    local = write_config(tmp_path, accounts)  # the same accounts on a SQLite ledger
    quiet = subprocess.run(
        [sys.executable, "-m", "popsync", "-c", str(local), "check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert (quiet.returncode, quiet.stderr) == (0, "")


def test_db_upgrade_names_the_ledger_without_its_password(
    tmp_path: Path, postgres: PostgresCluster
) -> None:
    name = postgres.new_database("db_upgrade")
    try:
        # The test cluster trusts loopback connections: any password will do.
        url = postgres.url(name).replace("popsync@", "popsync:hunter2@")
        config = write_config(tmp_path, [{"name": "acct", "port": 110}], ledger_url=url)
        proc = popsync_process(config, "db", "upgrade")
        out, err = proc.communicate(timeout=60)
    finally:
        postgres.drop_database(name)
    assert proc.returncode == 0, err
    assert out.strip() == (
        f"ledger postgresql+psycopg://popsync:***@127.0.0.1:{postgres.port}/{name}: "
        "schema is up to date"
    )
    assert "hunter2" not in out + err
