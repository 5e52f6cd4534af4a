"""The lease table: each due account is claimed by exactly one worker, leases
expire on the database's clock, and a release carries the schedule on.

Runs on SQLite and on a real PostgreSQL (``ledger_url``); the claims that
race run on PostgreSQL only, where several workers share one ledger.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import update

from popsync.claimer import Claimer
from popsync.ledger import Ledger, PollCounts
from popsync.ledger.leases import Claim
from popsync.ledger.models import accounts
from tests.helpers import wait_until, write_config

NAMES = [f"acct{i:03d}" for i in range(60)]


def test_due_rows_are_claimed_once_and_released_with_their_schedule(ledger_url: str) -> None:
    with Ledger.open(ledger_url) as ledger:
        assert ledger.ensure_accounts(NAMES[:3]) == 3
        assert ledger.ensure_accounts(NAMES[:3]) == 0  # rows kept as they are
        first = ledger.claim("w1", 2, lease=30.0)
        assert len(first) == 2
        rest = ledger.claim("w2", 5, lease=30.0)
        assert [c.name for c in rest] == sorted(set(NAMES[:3]) - {c.name for c in first})
        assert ledger.claim("w3", 5, lease=30.0) == []  # all leased
        name = first[0].name
        assert ledger.renew("w1", [name, rest[0].name], lease=30.0) == {name}
        assert ledger.release("w1", name, delay=None, failures=3, login_delay=60)
        rows = ledger.lease_rows()
        assert rows[name].paused and rows[name].next_poll_at is None
        assert rows[name].owner is None and rows[name].last_owner == "w1"
        assert rows[name].failures == 3
        assert ledger.claim("w3", 5, lease=30.0) == []  # paused: nobody claims it
        ledger.poll_now([name])  # SIGUSR1: due again, after the LOGIN-DELAY floor
        assert not ledger.lease_rows()[name].paused
        ledger.reset_accounts([name])  # a changed entry: due now, fresh schedule
        (again,) = ledger.claim("w3", 5, lease=30.0)
        assert (again.name, again.failures, again.login_delay) == (name, 0, None)
        # Not over another worker's live claim...
        assert not ledger.release("w1", name, delay=5.0, failures=0, login_delay=None)
        ledger.forget_accounts([name])
        assert name not in ledger.lease_rows()


def test_an_expired_lease_is_taken_over_on_the_database_clock(ledger_url: str) -> None:
    with Ledger.open(ledger_url) as ledger:
        ledger.ensure_accounts(["home"])
        (claim,) = ledger.claim("dead", 1, lease=0.3)
        assert ledger.claim("alive", 1, lease=10.0) == []
        until = ledger.lease_rows()["home"].lease_until
        assert until is not None
        while ledger.database_time() <= until:  # bounded by the lease itself
            time.sleep(0.05)
        (taken,) = ledger.claim("alive", 1, lease=10.0)
        assert taken.name == claim.name
        assert ledger.renew("dead", ["home"], lease=10.0) == set()  # the dead one lost it
        assert ledger.lease_rows()["home"].last_owner == "alive"


@pytest.mark.parametrize("ledger_url", ["postgresql"], indirect=True)
def test_workers_claiming_at_once_never_share_an_account(ledger_url: str) -> None:
    with Ledger.open(ledger_url) as setup:
        setup.ensure_accounts(NAMES)
    got: Counter[str] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(6)

    def worker(n: int) -> None:
        with Ledger.open(ledger_url) as ledger:
            start.wait(30)
            while claims := ledger.claim(f"w{n}", 3, lease=60.0):
                with lock:
                    got.update(c.name for c in claims)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert got == Counter(NAMES)


def test_status_names_the_worker_that_polled_each_account_last(
    postgres_url: str, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path,
        [{"name": "home", "port": 110}, {"name": "work", "port": 110}],
        ledger_url=postgres_url,
    )
    with Ledger.open(postgres_url) as ledger:
        ledger.ensure_accounts(["home", "work"])
        claims = ledger.claim("hostA:41:abc", 1, lease=30.0)
        assert [c.name for c in claims] == ["home"]
        poll = ledger.start_poll("home", time.time())
        ledger.finish_poll(
            poll,
            finished_at=time.time(),
            result="ok",
            error=None,
            temporary=None,
            counts=PollCounts(),
            next_poll_at=None,
        )
        ledger.release("hostA:41:abc", "home", delay=300.0, failures=0, login_delay=None)

    def status(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "popsync", "-c", str(config), "status", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout + result.stderr

    home, work = status().splitlines()
    assert home.startswith("home: last poll ") and " ago by worker hostA:41:abc: ok;" in home
    assert "; next poll in 4 min" in home or "; next poll in 5 min" in home, home
    assert work.startswith("work: never polled")
    entries = json.loads(status("--json"))["accounts"]
    assert [(e["account"], e["last_owner"]) for e in entries] == [
        ("home", "hostA:41:abc"),
        ("work", None),
    ]
    assert entries[0]["last_poll"]["next_poll_at"] is not None


@pytest.mark.parametrize("ledger_url", ["postgresql"], indirect=True)
def test_the_claimer_renews_its_leases_and_reports_one_taken_over(ledger_url: str) -> None:
    with Ledger.open(ledger_url) as ledger:
        ledger.ensure_accounts(["home", "work"])
        started: queue.Queue[str] = queue.Queue()
        lost: queue.Queue[set[str]] = queue.Queue()

        def start(claim: Claim) -> bool:
            started.put(claim.name)
            return True

        claimer = Claimer(ledger, owner="me:1:a", lease=0.6, slots=4, start=start, on_lost=lost.put)
        claimer.start()
        try:
            assert {started.get(timeout=10), started.get(timeout=10)} == {"home", "work"}
            first = ledger.lease_rows()["home"].lease_until
            assert first is not None
            # Renewed past the first lease, while the polls "run": nobody else gets them.
            wait_until(
                lambda: (ledger.lease_rows()["home"].lease_until or 0) > first + 0.6, timeout=10
            )
            assert ledger.claim("other:2:b", 4, lease=10.0) == []
            # A worker that stalled past its lease finds the account taken over.
            with ledger.engine.begin() as conn:
                conn.execute(update(accounts).where(accounts.c.name == "work").values(owner="x"))
            assert lost.get(timeout=10) == {"work"}
            claimer.done("home")
            claimer.done("work")
        finally:
            claimer.stop()
        assert lost.empty()
