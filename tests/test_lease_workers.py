"""Several ``popsync run`` workers sharing the accounts of one config through a
PostgreSQL ledger's leases: every account polled, never two sessions of one
account at once, nothing lost or duplicated, and a SIGKILLed worker's accounts
taken over within one lease.

Real processes (``sys.executable -m popsync run``), the project's POP3 test
server serving one maildrop per account (it records a login that overlaps
another session of the same maildrop), and the private PostgreSQL of
``tests/postgres_fixtures.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from popsync.ledger import Ledger
from popsync.testing.mailstore import MailStore
from popsync.testing.server import POP3TestServer, SessionState
from tests.helpers import maildir_contents, wait_until, write_config

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ACCOUNTS = 30
INTERVAL = 2
LEASE = 2.0
#: The account whose first RETR stalls until the test lets it go.
SLOW = "u07"


def message(user: str, n: int) -> bytes:
    return f"Subject: {user} #{n}\r\nMessage-ID: <{user}.{n}@test>\r\n\r\nbody {n}\r\n".encode()


class Stall:
    """An ``on_command`` hook: the first RETR of *user* waits until released."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.reached = threading.Event()
        self.release = threading.Event()
        self._done = False

    def __call__(self, state: SessionState, line: bytes) -> bytes | None:
        if state.user == self.user and line.upper().startswith(b"RETR") and not self._done:
            self._done = True
            self.reached.set()
            self.release.wait(60)
        return None


def start_worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "popsync", "-c", str(config), "run"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(os.environ),
        )


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def test_three_workers_share_thirty_accounts_and_take_over_a_killed_one(
    tmp_path: Path, postgres_url: str, workers: list[subprocess.Popen[bytes]]
) -> None:
    users = [f"u{i:02d}" for i in range(ACCOUNTS)]
    sent = {u: [message(u, n) for n in range(2)] for u in users}
    boxes = {u: MailStore(sent[u]) for u in users}
    stall = Stall(SLOW)
    with POP3TestServer(mailboxes=boxes, on_command=stall) as srv:
        accounts = [
            {
                "name": u,
                "port": srv.port,
                "username": u,
                "interval": INTERVAL,
                "delete_after_days": 0,
            }
            for u in users
        ]
        config = write_config(tmp_path, accounts, ledger_url=postgres_url)
        doc = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**doc, "lease": LEASE}, sort_keys=False))
        logs = [tmp_path / f"worker{i}.log" for i in range(3)]
        Ledger.open(postgres_url).close()  # the schema, before the workers race for it
        workers += [start_worker(config, log) for log in logs]

        def logs_text() -> str:
            return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in logs)

        with Ledger.open(postgres_url) as ledger:
            # One worker is stuck in the slow account's RETR: kill it there.
            assert stall.reached.wait(30), logs_text()
            owner = wait_until(lambda: ledger.lease_rows()[SLOW].owner, timeout=10)
            victim = next(p for p in workers if owner.split(":")[1] == str(p.pid))
            victim.send_signal(signal.SIGKILL)
            victim.wait(30)
            killed_at = ledger.database_time()
            stall.release.set()  # the server notices the dead connection
            # New mail keeps arriving while the others take over.
            for n in range(2, 4):
                for u in users:
                    mail = message(u, n)
                    boxes[u].add(mail)
                    sent[u].append(mail)

            def taken_over() -> float | None:
                row = ledger.lease_rows()[SLOW]
                if row.last_owner == owner or row.last_poll_at is None:
                    return None
                return row.last_poll_at if row.last_poll_at > killed_at else None

            took = wait_until(taken_over, timeout=30, what=logs_text)
            assert took - killed_at <= LEASE + INTERVAL, logs_text()

            def all_fetched() -> bool:
                return all(
                    sum(maildir_contents(tmp_path / "Maildir" / u).values()) >= len(sent[u])
                    and not len(boxes[u])
                    for u in users
                )

            wait_until(all_fetched, timeout=40, what=logs_text, interval=0.2)
            rows = ledger.lease_rows()
        survivors = [p for p in workers if p is not victim]
        for proc in survivors:
            proc.send_signal(signal.SIGTERM)
        assert [p.wait(60) for p in survivors] == [0, 0], logs_text()
        overlaps = [(r.number, r.user) for r in srv.overlaps()]
    assert overlaps == [], logs_text()
    for u in users:  # every message exactly once, none left behind
        stored = Counter(m.replace(b"\r\n", b"\n") for m in sent[u])  # Maildir: LF
        assert maildir_contents(tmp_path / "Maildir" / u) == stored, u
    # Every account was polled, by the three workers between them.
    assert set(rows) == set(users)
    assert all(r.last_poll_at is not None for r in rows.values())
    owners = {r.last_owner for r in rows.values()}
    assert len(owners) >= 2 and owner not in {rows[SLOW].last_owner}
