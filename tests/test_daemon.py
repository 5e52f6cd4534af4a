"""The daemon (``popsync run``): scheduling, backoff, pausing, reloads and signals.

Real conditions throughout: the project's POP3 test server on loopback, a real
SQLite ledger and real Maildirs under tmp_path.  Scheduling tests run the
daemon in-process in a thread (intervals of 1 s, a backoff base of 0.2 s);
signal tests run ``python -m popsync -c CONFIG run`` as a real process and
send it real signals.  The policy (:func:`decide`) is also checked as a table.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import pytest

from popsync.cli import main as cli_main
from popsync.config import load_config
from popsync.daemon import (
    MAX_LOGIN_DELAY,
    Backoff,
    Daemon,
    Outcome,
    PollEvent,
    Schedule,
    classify,
    decide,
    jitter_for,
)
from popsync.errors import RespCode, ServerError, TransportError
from popsync.ledger import Ledger, PollCounts
from popsync.locks import AccountBusy, account_lock
from popsync.session import Session, SessionOptions
from popsync.sync import PollReport
from popsync.testing.faults import Faults
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from popsync.testing.server_state import SessionState
from tests.helpers import maildir_contents, stored_form, wait_until, write_config

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
AUTH_FAULT = Faults(
    errors={"PASS": b"-ERR [AUTH] invalid credentials", "AUTH": b"-ERR [AUTH] invalid credentials"}
)
SECRET = "s3cret-Pw-7f1c"  # a test password that must never reach a log


def messages(n: int, seed: int) -> list[bytes]:
    return list(generate_messages(n, 600, seed=seed))


def assert_exactly_once(maildir: Path | None, expected: list[bytes]) -> None:
    contents = maildir_contents(maildir)
    assert set(contents) == {stored_form(m) for m in expected}
    assert all(n == 1 for n in contents.values()), "a message was delivered twice"


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class UidlGate:
    """An ``on_command`` hook that, once armed, holds the next UIDL until released:
    a poll kept in flight at a point the test chooses."""

    def __init__(self) -> None:
        self.armed = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, state: SessionState, line: bytes) -> bytes | None:
        if self.armed.is_set() and line.upper() == b"UIDL":
            self.armed.clear()
            self.entered.set()
            assert self.release.wait(30), "the test never released the held UIDL"
        return None


class RetrLog:
    """An ``on_command`` hook that records which UID every RETR asked for."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.uids: list[bytes] = []
        self.first = threading.Event()

    def __call__(self, state: SessionState, line: bytes) -> bytes | None:
        parts = line.split()
        if parts and parts[0].upper() == b"RETR" and len(parts) == 2 and parts[1].isdigit():
            n = int(parts[1])
            if 1 <= n <= len(state.uids):
                with self.lock:
                    self.uids.append(state.uids[n - 1])
                self.first.set()
        return None

    def counts(self) -> Counter[bytes]:
        with self.lock:
            return Counter(self.uids)


@pytest.fixture
def servers() -> Iterator[Callable[..., POP3TestServer]]:
    started: list[POP3TestServer] = []

    def start(msgs: list[bytes] | None = None, **kw: Any) -> POP3TestServer:
        kw.setdefault("password", SECRET)
        server = POP3TestServer(MailStore(msgs or []), **kw).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def account(name: str, port: int, **kw: Any) -> dict[str, Any]:
    return {"name": name, "port": port, "interval": 1, "secret": SECRET, **kw}


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``cli_main`` binds the popsync logger to this test's (captured) stderr;
    undo that, so a later test's daemon threads never log to a closed stream."""
    logger = logging.getLogger("popsync")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


@pytest.fixture
def daemon_log() -> Iterator[list[logging.LogRecord]]:
    """Records of the ``popsync.daemon`` logger at INFO and above."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("popsync.daemon")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def _no_exit(code: int) -> NoReturn:
    raise AssertionError(f"the in-process daemon tried to end the process ({code})")


class Harness:
    """An in-process daemon in a thread, recording every finished poll."""

    def __init__(self, config_path: Path, **kw: Any) -> None:
        self.config_path = config_path
        self.config = load_config(config_path)
        self.cond = threading.Condition()
        self.events: list[tuple[float, PollEvent]] = []
        kw.setdefault("backoff", Backoff(base=0.2))
        self.daemon = Daemon(
            self.config, config_path=config_path, on_poll=self._record, hard_exit=_no_exit, **kw
        )
        self.status: int | None = None
        self.thread = threading.Thread(target=self._serve, name="daemon-under-test", daemon=True)

    def _serve(self) -> None:
        self.status = self.daemon.serve()

    def _record(self, event: PollEvent) -> None:
        with self.cond:
            self.events.append((time.monotonic(), event))
            self.cond.notify_all()

    def start(self) -> Harness:
        self.thread.start()
        assert self.daemon.started.wait(10), "the daemon did not start"
        return self

    def polls(self, name: str) -> list[PollEvent]:
        with self.cond:
            return [e for _, e in self.events if e.account == name]

    def timed(self, name: str) -> list[tuple[float, PollEvent]]:
        with self.cond:
            return [(t, e) for t, e in self.events if e.account == name]

    def wait_polls(self, name: str, n: int, timeout: float = 10.0) -> list[PollEvent]:
        """Wait until *name* has at least *n* finished polls; return them all."""
        with self.cond:
            ok = self.cond.wait_for(
                lambda: sum(e.account == name for _, e in self.events) >= n, timeout
            )
            got = [e for _, e in self.events if e.account == name]
        assert ok, f"{name}: {len(got)} of {n} polls in {timeout} s: {got}"
        return got

    def wait_event(
        self, name: str, predicate: Callable[[PollEvent], bool], timeout: float = 10.0
    ) -> PollEvent:
        """Wait for a poll of *name* that satisfies *predicate* (a new one or an old one)."""
        found: list[PollEvent] = []

        def match() -> bool:
            found[:] = [e for _, e in self.events if e.account == name and predicate(e)]
            return bool(found)

        with self.cond:
            assert self.cond.wait_for(match, timeout), f"{name}: no matching poll in {timeout} s"
        return found[0]

    def stop(self) -> None:
        self.daemon.request_stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "the daemon did not stop"
        assert self.status == 0


@pytest.fixture
def harness() -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(config_path: Path, **kw: Any) -> Harness:
        h = Harness(config_path, **kw)
        made.append(h)
        return h.start()

    yield make
    for h in made:
        if h.thread.is_alive():
            h.stop()


# --------------------------------------------------------------------------
# The policy, as a table


def test_backoff_doubles_from_its_base_and_is_capped() -> None:
    b = Backoff()
    assert [b.delay(300, n) for n in range(1, 10)] == [
        30,
        60,
        120,
        240,
        480,
        960,
        1920,
        2400,  # 8 intervals
        2400,
    ]
    assert b.delay(7200, 20) == 7200  # never slower than the normal schedule ...
    assert b.delay(600, 20) == 3600  # ... and at most an hour below that
    assert b.delay(1, 5) == 8
    assert b.delay(300, 10_000) == 2400  # no overflow


def test_jitter_is_a_tenth_capped_at_half_a_minute() -> None:
    assert jitter_for(1) == pytest.approx(0.1)
    assert jitter_for(300) == pytest.approx(30)
    assert jitter_for(86400) == 30


B = Backoff()


@pytest.mark.parametrize(
    ("schedule", "outcome", "expected_delay", "expected"),
    [
        # success: the normal interval, failures forgotten
        (Schedule(300, failures=3), Outcome("ok"), 300, Schedule(300)),
        # temporary: backoff by the count of failures in a row
        (Schedule(300), Outcome("temporary"), 30, Schedule(300, failures=1)),
        (Schedule(300, failures=2), Outcome("temporary"), 120, Schedule(300, failures=3)),
        # [AUTH] and friends: paused, no next poll
        (Schedule(300), Outcome("permanent"), None, Schedule(300, failures=1, paused=True)),
        # another popsync holds the lock: the normal interval, nothing counted
        (Schedule(300, failures=2), Outcome("busy"), 300, Schedule(300, failures=2)),
        # LOGIN-DELAY above the interval raises it ...
        (Schedule(60), Outcome("ok", login_delay=900), 900, Schedule(60, login_delay=900)),
        # ... below it changes nothing ...
        (Schedule(600), Outcome("ok", login_delay=300), 600, Schedule(600, login_delay=300)),
        # ... and is a floor under every retry
        (
            Schedule(60, login_delay=900),
            Outcome("temporary"),
            900,
            Schedule(60, failures=1, login_delay=900),
        ),
        # a success without the capability drops the floor
        (Schedule(60, login_delay=900), Outcome("ok"), 60, Schedule(60)),
        # -ERR [LOGIN-DELAY]: at least a whole interval
        (Schedule(300), Outcome("temporary", too_soon=True), 300, Schedule(300, failures=1)),
        # a hostile LOGIN-DELAY is capped at a day
        (
            Schedule(60),
            Outcome("ok", login_delay=10**9),
            MAX_LOGIN_DELAY,
            Schedule(60, login_delay=MAX_LOGIN_DELAY),
        ),
        # SIGUSR1 on a paused account that now works: unpaused
        (Schedule(60, failures=1, paused=True), Outcome("ok"), 60, Schedule(60)),
    ],
)
def test_decide(
    schedule: Schedule, outcome: Outcome, expected_delay: float | None, expected: Schedule
) -> None:
    decision = decide(schedule, outcome, B)
    assert decision.delay == expected_delay
    assert decision.schedule == expected


def test_classify_reads_the_error_type_and_response_code() -> None:
    def failed(exc: Any) -> PollReport:
        return PollReport("a", error=str(exc), temporary=exc.temporary, exception=exc)

    auth = ServerError("PASS", b"[AUTH] no", RespCode(("AUTH",)))
    in_use = ServerError("PASS", b"[IN-USE] busy", RespCode(("IN-USE",)))
    delay = ServerError("PASS", b"[LOGIN-DELAY] wait", RespCode(("LOGIN-DELAY",)))
    perm = ServerError("PASS", b"[SYS/PERM] gone", RespCode(("SYS", "PERM")))
    assert classify(PollReport("a", ok=True, login_delay=60)) == Outcome("ok", 60)
    assert classify(failed(auth)).kind == "permanent"
    assert classify(failed(perm)).kind == "permanent"
    assert classify(failed(in_use)) == Outcome("temporary")
    assert classify(failed(delay)) == Outcome("temporary", too_soon=True)
    assert classify(failed(TransportError("refused"))).kind == "temporary"
    assert classify(failed(AccountBusy("a", 123))).kind == "busy"


# --------------------------------------------------------------------------
# The ledger records the next poll for `popsync status`


def test_set_next_poll_marks_the_latest_poll_of_that_account(tmp_path: Path) -> None:
    with Ledger.open(f"sqlite:///{tmp_path / 'l.db'}") as ledger:
        assert ledger.set_next_poll("a", 5.0) is False  # no poll yet: nothing written
        first = ledger.start_poll("a", 100.0)
        second = ledger.start_poll("a", 200.0)
        other = ledger.start_poll("b", 300.0)
        for poll, at in ((first, 101.0), (second, 201.0), (other, 301.0)):
            ledger.finish_poll(
                poll,
                finished_at=at,
                result="ok",
                error=None,
                temporary=None,
                counts=PollCounts(),
                next_poll_at=None,
            )
        assert ledger.set_next_poll("a", 500.0) is True
        polls = ledger.last_polls()
        assert polls["a"].id == second and polls["a"].next_poll_at == 500.0
        assert polls["b"].next_poll_at is None
        assert ledger.set_next_poll("a", None) is True
        assert ledger.last_polls()["a"].next_poll_at is None


# --------------------------------------------------------------------------
# Scheduling, in-process


def test_new_mail_is_fetched_within_one_interval_and_status_shows_the_next_poll(
    tmp_path: Path,
    servers: Callable[..., POP3TestServer],
    harness: Callable[..., Harness],
    capsys: pytest.CaptureFixture[str],
) -> None:
    srv = {name: servers(messages(2, seed)) for seed, name in enumerate(("a", "b", "c"))}
    cfg = write_config(tmp_path, [account(name, s.port) for name, s in srv.items()])
    h = harness(cfg)
    for name in srv:
        assert h.wait_polls(name, 1)[0].report.counts.fetched == 2

    new = messages(1, 99)[0]
    srv["b"].store.add(new)
    arrived = time.monotonic()
    event = h.wait_event("b", lambda e: e.report.counts.fetched == 1)
    latency = next(t for t, e in h.timed("b") if e is event) - arrived
    assert latency < 1.0 + jitter_for(1) + 0.5, f"new mail took {latency:.2f} s"
    assert_exactly_once(
        h.config.select(["b"])[0].maildir, [m.data for m in srv["b"].store.messages()]
    )

    # `popsync status` (the real command) reads the next poll time from the ledger.
    event = h.wait_polls("a", len(h.polls("a")) + 1)[-1]
    assert cli_main(["-c", str(cfg), "status", "--json"]) == 0
    status = {row["account"]: row for row in json.loads(capsys.readouterr().out)["accounts"]}
    assert event.next_poll_at is not None
    last = status["a"]["last_poll"]
    # ISO 8601 UTC to the second; the same clock as the event's.
    next_poll = datetime.fromisoformat(last["next_poll_at"]).timestamp()
    assert next_poll == pytest.approx(event.next_poll_at, abs=1.0)
    assert last["finished_at"] <= last["next_poll_at"]
    h.stop()


def test_a_down_server_backs_off_while_the_others_keep_their_schedule(
    tmp_path: Path, servers: Callable[..., POP3TestServer], harness: Callable[..., Harness]
) -> None:
    up = servers(messages(1, 1))
    flaky = servers(
        messages(1, 2), faults=Faults(errors={"GREETING": b"-ERR [SYS/TEMP] maintenance"})
    )
    slow = servers(messages(1, 3), faults=Faults(stall={"GREETING": 2.5}))
    cfg = write_config(
        tmp_path,
        [
            account("up", up.port),
            account("down", closed_port()),
            account("flaky", flaky.port),
            account("slow", slow.port),
        ],
    )
    h = harness(cfg)

    # The flaky server fails three times (0.2 s, 0.4 s, 0.8 s apart), then recovers.
    failed = h.wait_polls("flaky", 3)
    flaky.faults = Faults()
    assert [e.delay for e in failed] == [0.2, 0.4, 0.8]
    assert [e.failures for e in failed] == [1, 2, 3]
    recovered = h.wait_polls("flaky", 4)[3]
    assert recovered.report.ok and recovered.delay == 1.0 and recovered.failures == 0

    # The refused one keeps doubling (capped at 8 intervals) ...
    down = h.wait_polls("down", 5)
    assert [e.delay for e in down[:5]] == [0.2, 0.4, 0.8, 1.6, 3.2]
    assert all(not e.report.ok and not e.paused for e in down)
    for e in down:
        assert e.next_poll_at is not None and e.delay is not None
        assert e.next_poll_at >= time.time() - 30  # recorded as a wall-clock time

    # ... while "up" kept its 1 s rhythm, even during slow's 2.5 s greeting.
    h.wait_polls("up", 4)
    times = [t for t, e in h.timed("up")]
    assert all(e.report.ok and e.delay == 1.0 for e in h.polls("up"))
    assert len(times) >= 4
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < 1.0 + jitter_for(1) + 0.4, gaps
    assert h.polls("slow")[0].report.ok  # the slow one finished in its own time
    h.stop()


def test_auth_error_pauses_one_account_until_its_entry_changes(
    tmp_path: Path,
    servers: Callable[..., POP3TestServer],
    harness: Callable[..., Harness],
    daemon_log: list[logging.LogRecord],
) -> None:
    good = servers(messages(1, 1))
    bad = servers(messages(2, 2), faults=AUTH_FAULT)
    entries = [account("good", good.port), account("bad", bad.port)]
    cfg = write_config(tmp_path, entries)
    h = harness(cfg)

    first = h.wait_polls("bad", 1)[0]
    assert first.paused and first.next_poll_at is None and first.delay is None
    n_good = len(h.wait_polls("good", 1))
    h.wait_polls("good", n_good + 2)  # two more intervals pass
    assert len(bad.sessions) == 1, "a paused account must not be retried on its own"
    paused_lines = [r.getMessage() for r in daemon_log if "PAUSED" in r.getMessage()]
    assert len(paused_lines) == 1
    assert "bad: PAUSED" in paused_lines[0] and "[AUTH]" in paused_lines[0]
    assert all(SECRET not in r.getMessage() for r in daemon_log)
    assert h.daemon.snapshot()["bad"].paused

    # SIGUSR1 (the same request) gives it exactly one more try.
    h.daemon.request_poll_now()
    assert h.wait_polls("bad", 2)[1].paused
    assert len(bad.sessions) == 2

    # A reload with the same entry keeps it paused, even once the server is fixed.
    bad.faults = Faults()
    h.daemon.request_reload()
    n_good = len(h.polls("good"))
    h.wait_polls("good", n_good + 2)
    assert len(bad.sessions) == 2
    assert any("still paused" in r.getMessage() for r in daemon_log)

    # A changed entry resumes it at once.
    entries[1] = {**entries[1], "timeout": 9}
    write_config(tmp_path, entries)
    h.daemon.request_reload()
    resumed = h.wait_polls("bad", 3)[2]
    assert resumed.report.ok and resumed.report.counts.fetched == 2 and not resumed.paused
    assert not h.daemon.snapshot()["bad"].paused
    h.stop()


def test_login_delay_raises_the_interval_with_one_warning(
    tmp_path: Path,
    servers: Callable[..., POP3TestServer],
    harness: Callable[..., Harness],
    daemon_log: list[logging.LogRecord],
) -> None:
    srv = servers(messages(1, 1), login_delay=2)
    cfg = write_config(tmp_path, [account("slowpoke", srv.port)])
    h = harness(cfg)
    polls = h.wait_polls("slowpoke", 2, timeout=8)
    assert [e.delay for e in polls[:2]] == [2.0, 2.0]
    (t1, _), (t2, _) = h.timed("slowpoke")[:2]
    assert t2 - t1 >= 2.0 - 0.1, "polled sooner than the server's LOGIN-DELAY"
    view = h.daemon.snapshot()["slowpoke"]
    assert view.login_delay == 2 and view.effective_interval == 2.0 and view.interval == 1
    warnings = [r.getMessage() for r in daemon_log if "LOGIN-DELAY" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "every 2 s instead of every 1 s" in warnings[0]
    h.stop()


def test_reload_adds_removes_and_changes_accounts(
    tmp_path: Path, servers: Callable[..., POP3TestServer], harness: Callable[..., Harness]
) -> None:
    gate = UidlGate()
    a, b, c = (
        servers(messages(1, 1)),
        servers(messages(1, 2), on_command=gate),
        servers(messages(3, 3)),
    )
    cfg = write_config(tmp_path, [account("a", a.port), account("b", b.port)])
    h = harness(cfg)
    h.wait_polls("a", 1)
    polls_b = len(h.wait_polls("b", 1))

    # The reload comes while a poll of b is in flight (held at its UIDL).
    gate.armed.set()
    assert gate.entered.wait(10), "b was not polled again"
    write_config(tmp_path, [account("a", a.port, interval=2), account("c", c.port)])
    h.daemon.request_reload()
    assert h.wait_polls("c", 1)[0].report.counts.fetched == 3
    assert set(h.daemon.snapshot()) == {"a", "c"}
    gate.release.set()
    # The poll in flight ends as usual.  It kept any other poll of b from
    # starting until the reload removed b, so once every session of b is a
    # reported poll, none is in flight, and none may start: that must stay
    # so while a is polled again (2 s, twice b's old interval).
    wait_until(
        lambda: len(h.polls("b")) == len(b.sessions) > polls_b,
        what=lambda: f"the polls of b to end: {len(b.sessions)} sessions, {h.polls('b')}",
    )
    assert all(e.report.ok for e in h.polls("b"))
    sessions_b = len(b.sessions)
    changed = h.wait_event("a", lambda e: e.delay == 2.0)
    assert changed.report.ok
    assert h.daemon.snapshot()["a"].interval == 2
    h.wait_polls("a", len(h.polls("a")) + 1)
    assert len(b.sessions) == sessions_b, "a removed account was polled"
    assert len(h.polls("b")) == sessions_b
    h.stop()


def test_a_busy_account_is_skipped_and_polled_at_its_next_time(
    tmp_path: Path,
    servers: Callable[..., POP3TestServer],
    harness: Callable[..., Harness],
    daemon_log: list[logging.LogRecord],
) -> None:
    srv = servers(messages(2, 1))
    cfg = write_config(tmp_path, [account("a", srv.port)])
    config = load_config(cfg)
    with account_lock(config.state_dir, "a", wait=False):  # as a running `popsync sync` does
        h = harness(cfg)
        busy = h.wait_polls("a", 1)[0]
    assert busy.outcome.kind == "busy" and busy.delay == 1.0 and busy.failures == 0
    assert srv.sessions == []
    skipped = [r.getMessage() for r in daemon_log if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "polling it already" in skipped[0]
    done = h.wait_polls("a", 2)[1]
    assert done.report.ok and done.report.counts.fetched == 2
    h.stop()


def test_a_daemon_and_concurrent_syncs_never_fetch_a_message_twice(
    tmp_path: Path,
    servers: Callable[..., POP3TestServer],
    harness: Callable[..., Harness],
    ledger_url: str,
) -> None:
    retrs = RetrLog()
    # No server-side maildrop lock: only popsync's own lock keeps polls apart.
    srv = servers(
        messages(20, 1),
        exclusive_lock=False,
        on_command=retrs,
        faults=Faults(stall={"UIDL": 0.2, "RETR": 0.01}),
    )
    cfg = write_config(tmp_path, [account("a", srv.port)], ledger_url=ledger_url)
    h = harness(cfg)
    stop = threading.Event()

    def feed() -> None:
        # New mail keeps arriving while the syncs and the daemon contend.
        for data in generate_messages(40, 600, seed=5):
            if stop.wait(0.05):
                return
            srv.store.add(data)

    def sync_loop(results: list[tuple[int, str]]) -> None:
        while not stop.is_set():
            proc = subprocess.run(
                [sys.executable, "-m", "popsync", "-c", str(cfg), "sync", "--no-progress"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            results.append((proc.returncode, proc.stderr))

    results: list[tuple[int, str]] = []
    feeder = threading.Thread(target=feed)
    workers = [feeder] + [threading.Thread(target=sync_loop, args=(results,)) for _ in range(3)]
    for w in workers:
        w.start()
    # The contention lasts until all mail has arrived and, after that, each
    # contender has had a turn more: three syncs and a daemon poll.
    feeder.join(30)
    assert not feeder.is_alive()
    syncs, polls = len(results) + 3, len(h.polls("a")) + 1
    wait_until(
        lambda: len(results) >= syncs and len(h.polls("a")) >= polls,
        timeout=40,
        what=lambda: f"{syncs} syncs and {polls} daemon polls: {len(results)}, {h.polls('a')}",
    )
    stop.set()
    for w in workers:
        w.join(30)
    h.stop()
    # Each poll either ran alone or stood aside: never a clash in the ledger.
    assert results
    for status, stderr in results:
        assert status == 0 or (status == 1 and "is polling it already" in stderr), stderr
    assert {e.outcome.kind for e in h.polls("a")} <= {"ok", "busy"}
    assert cli_main(["-c", str(cfg), "-q", "sync", "--no-progress"]) == 0  # the stragglers

    counts = retrs.counts()
    assert counts and max(counts.values()) == 1, "a message was fetched twice"
    assert set(counts) == set(srv.store.uids())
    assert_exactly_once(h.config.select(["a"])[0].maildir, [m.data for m in srv.store.messages()])


def test_a_poll_stuck_past_its_poll_timeout_is_cut_and_frees_the_worker(
    tmp_path: Path,
    servers: Callable[..., POP3TestServer],
    harness: Callable[..., Harness],
    daemon_log: list[logging.LogRecord],
) -> None:
    # The session's own limits are lifted (no deadline, a 30 s read timeout),
    # as if a bug had lost them: only the daemon's watchdog can end this poll.
    def unbounded(opts: SessionOptions, on_open: Callable[[Session], None]) -> Session:
        lifted = dataclasses.replace(opts, poll_timeout=None, timeout=30.0)
        return Session.open(lifted, on_open=on_open)

    stuck = servers(messages(1, 1), faults=Faults(stall={"UIDL": 30}))
    other = servers(messages(1, 2))
    cfg = write_config(
        tmp_path,
        [account("stuck", stuck.port, timeout=1, poll_timeout=1), account("other", other.port)],
    )
    # One worker: while the stuck poll holds it, no other poll can run.
    h = harness(cfg, max_concurrent=1, overrun_grace=0.5, open_session=unbounded)
    cut = h.wait_event("stuck", lambda e: not e.report.ok)
    assert cut.report.error == (
        "poll took longer than poll_timeout (1 s) and was cut off by the daemon"
    )
    assert cut.report.seconds < 1 + 0.5 + 1.0, cut.report.seconds
    assert cut.outcome.kind == "temporary" and not cut.paused
    h.wait_polls("other", len(h.polls("other")) + 1, timeout=5)  # the worker is free again
    warnings = [r.getMessage() for r in daemon_log if "cutting its connection" in r.getMessage()]
    assert warnings[0] == (
        "stuck: poll still running 0.5 s after its poll_timeout of 1 s; cutting its connection"
    )
    assert len(stuck.store) == 1  # no QUIT: the server deleted nothing
    assert not any(record.quit_received for record in stuck.sessions)
    h.stop()


# --------------------------------------------------------------------------
# Signals, on a real process


class DaemonProcess:
    """``python -m popsync [...] -c CONFIG run [...]`` with stderr in a file."""

    count = 0

    def __init__(
        self, config: Path, tmp: Path, *run_args: str, global_args: tuple[str, ...] = ()
    ) -> None:
        DaemonProcess.count += 1
        self.log = tmp / f"daemon-{DaemonProcess.count}.log"
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "popsync",
                    "-c",
                    str(config),
                    *global_args,
                    "run",
                    *run_args,
                ],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, count: int = 1, timeout: float = 15.0) -> None:
        def seen() -> bool:
            assert self.proc.poll() is None, f"the daemon exited:\n{self.output()}"
            return self.output().count(text) >= count

        wait_until(seen, timeout=timeout, what=lambda: f"{text!r} x{count} in:\n{self.output()}")

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    procs: list[DaemonProcess] = []

    def start(config: Path, *run_args: str, **kw: Any) -> DaemonProcess:
        proc = DaemonProcess(config, tmp_path, *run_args, **kw)
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


def wait_for_files(maildir: Path | None, n: int, timeout: float = 10.0) -> None:
    wait_until(
        lambda: sum(maildir_contents(maildir).values()) >= n,
        timeout=timeout,
        what=f"{n} messages in {maildir}",
    )


def test_sighup_with_a_broken_config_keeps_the_old_one_and_adding_an_account_polls_it(
    tmp_path: Path,
    servers: Callable[..., POP3TestServer],
    spawn: Callable[..., DaemonProcess],
) -> None:
    a, b = servers(messages(2, 1)), servers(messages(3, 2))
    entries = [account("a", a.port)]
    cfg = write_config(tmp_path, entries)
    d = spawn(cfg)
    d.wait_for("a: ok: 2 on server, 2 new")

    cfg.write_text("accounts:\n  - name: [unclosed\n")
    d.send(signal.SIGHUP)
    d.wait_for("config reload failed; still running on the previous config")
    new = messages(1, 9)[0]
    a.store.add(new)  # the old config still polls
    d.wait_for("a: ok: 3 on server, 1 new")

    write_config(tmp_path, [*entries, account("b", b.port)])
    d.send(signal.SIGHUP)
    d.wait_for("added: b")
    d.wait_for("b: ok: 3 on server, 3 new, 3 fetched")
    d.send(signal.SIGTERM)
    assert d.wait() == 0
    assert "stopped" in d.output()
    config = load_config(cfg)
    assert_exactly_once(config.select(["a"])[0].maildir, [m.data for m in a.store.messages()])
    assert_exactly_once(config.select(["b"])[0].maildir, [m.data for m in b.store.messages()])


def test_sigusr1_polls_every_account_now_and_json_logs_hold_no_secret(
    tmp_path: Path,
    servers: Callable[..., POP3TestServer],
    spawn: Callable[..., DaemonProcess],
) -> None:
    good, bad = servers(messages(1, 1)), servers(messages(1, 2), faults=AUTH_FAULT)
    cfg = write_config(
        tmp_path,
        [account("good", good.port, interval=3600), account("bad", bad.port, interval=3600)],
    )
    d = spawn(cfg, global_args=("--log-format", "json"))
    d.wait_for('"event": "paused"')
    d.wait_for('"account": "good", "event": "poll"')
    good.store.add(messages(1, 7)[0])
    d.send(signal.SIGUSR1)
    d.wait_for("1 new, 1 fetched", count=2)  # the first poll's line says so too
    d.wait_for('"event": "paused"', count=2)  # one more try of the paused account
    d.send(signal.SIGINT)
    assert d.wait() == 0
    out = d.output()
    lines = [json.loads(line) for line in out.splitlines()]  # every line is one JSON object
    assert {"time", "level", "message"} <= set(lines[0])
    polls = [e for e in lines if e.get("event") == "poll" and e.get("account") == "good"]
    assert len(polls) == 2
    assert SECRET not in out
    assert len(bad.sessions) == 2


def test_poll_now_asked_while_a_poll_is_finishing_is_not_dropped(
    tmp_path: Path, servers: Callable[..., POP3TestServer], daemon_log: list[logging.LogRecord]
) -> None:
    """SIGUSR1 that lands after a poll's result is recorded but before its job
    has returned still polls again: the scheduler must not drop that run as
    "maximum number of running instances reached"."""
    srv = servers(messages(1, 1))
    cfg = write_config(tmp_path, [account("a", srv.port, interval=3600)])
    handled = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "event", None) == "poll-now":
                handled.set()

    seen = Seen()
    logging.getLogger("popsync.daemon").addHandler(seen)

    class AskDuringFinish(Harness):
        def _record(self, event: PollEvent) -> None:
            super()._record(event)
            if len(self.polls("a")) == 1:
                # Still inside the first poll's job: ask, and hold the job
                # until the main thread has acted on the request.
                srv.store.add(messages(1, 2)[0])
                self.daemon.request_poll_now()
                assert handled.wait(10)

    h = AskDuringFinish(cfg).start()
    try:
        first, second = h.wait_polls("a", 2)[:2]
        assert (first.report.counts.fetched, second.report.counts.fetched) == (1, 1)
    finally:
        logging.getLogger("popsync.daemon").removeHandler(seen)
        h.stop()


def test_the_daemon_shows_a_sessions_steps_only_with_v(
    tmp_path: Path,
    servers: Callable[..., POP3TestServer],
    spawn: Callable[..., DaemonProcess],
) -> None:
    srv = servers(messages(1, 3))
    quiet = spawn(write_config(tmp_path, [account("a", srv.port, interval=3600)]))
    quiet.wait_for("a: ok: ")
    quiet.send(signal.SIGINT)
    assert quiet.wait() == 0
    assert "connected to" not in quiet.output()  # one line per poll, not its steps
    verbose = spawn(
        write_config(tmp_path, [account("a", srv.port, interval=3600)]), global_args=("-v",)
    )
    verbose.wait_for("a: QUIT: +OK")
    verbose.send(signal.SIGINT)
    assert verbose.wait() == 0
    assert f"a: connected to 127.0.0.1:{srv.port}" in verbose.output()


def test_sigterm_during_a_long_retr_exits_cleanly_and_a_restart_is_exactly_once(
    tmp_path: Path,
    servers: Callable[..., POP3TestServer],
    spawn: Callable[..., DaemonProcess],
) -> None:
    retrs = RetrLog()
    first = messages(3, 1)
    srv = servers(first, faults=Faults(stall={"RETR": 0.7}), on_command=retrs)
    cfg = write_config(tmp_path, [account("a", srv.port, delete_after_days=0)])
    maildir = load_config(cfg).select(["a"])[0].maildir
    d = spawn(cfg)
    assert retrs.first.wait(15), d.output()  # the first RETR is being answered
    d.send(signal.SIGTERM)
    assert d.wait() == 0, d.output()
    out = d.output()
    assert "stopping: waiting up to 30 s for the poll(s) of a" in out
    assert "a: ok: 3 on server, 3 new, 3 fetched" in out and "stopped" in out
    assert_exactly_once(maildir, first)

    later = messages(2, 2)
    for data in later:
        srv.store.add(data)
    srv.faults = Faults()
    d = spawn(cfg)
    wait_for_files(maildir, 5)
    d.wait_for("a: ok")
    d.send(signal.SIGTERM)
    assert d.wait() == 0
    assert_exactly_once(maildir, first + later)
    assert max(retrs.counts().values()) == 1
    assert len(srv.store) == 0  # every copy was durable, so every message was deleted


@pytest.mark.parametrize("how", ["second signal", "grace expired"])
def test_a_forced_stop_cuts_the_poll_and_a_rerun_is_exactly_once(
    how: str,
    tmp_path: Path,
    servers: Callable[..., POP3TestServer],
    spawn: Callable[..., DaemonProcess],
) -> None:
    retrs = RetrLog()
    msgs = messages(4, 3)
    srv = servers(msgs, faults=Faults(stall={"RETR": 1.0}), on_command=retrs)
    cfg = write_config(tmp_path, [account("a", srv.port, delete_after_days=0)])
    d = spawn(cfg, "--grace", "0.3" if how == "grace expired" else "30")
    assert retrs.first.wait(15), d.output()
    started = time.monotonic()
    d.send(signal.SIGTERM)
    if how == "second signal":
        d.wait_for("stopping: waiting")
        d.send(signal.SIGINT)
    assert d.wait() == 1
    assert time.monotonic() - started < 1.0 + 0.5, "the stop was not forced promptly"
    out = d.output()
    assert ("second signal: aborting" if how == "second signal" else "grace period of") in out
    assert len(srv.store) == 4  # no QUIT, so the server deleted nothing

    srv.faults = Faults()
    srv.wait_for_sessions(1)  # the server notices the cut connection and unlocks the maildrop
    assert cli_main(["-c", str(cfg), "-q", "sync", "--no-progress"]) == 0
    assert_exactly_once(load_config(cfg).select(["a"])[0].maildir, msgs)
    assert len(srv.store) == 0


def test_bad_daemon_options_are_usage_errors(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, [account("a", closed_port())])
    assert cli_main(["-c", str(cfg), "run", "--max-concurrent", "0"]) == 2
    assert cli_main(["-c", str(cfg), "run", "--grace", "-1"]) == 2


def test_sigterm_before_any_poll_finishes_is_a_clean_exit(
    tmp_path: Path, servers: Callable[..., POP3TestServer], spawn: Callable[..., DaemonProcess]
) -> None:
    srv = servers(messages(1, 1), faults=Faults(stall={"GREETING": 0.5}))
    cfg = write_config(tmp_path, [account("a", srv.port)])
    d = spawn(cfg)
    d.wait_for("daemon started")
    d.send(signal.SIGTERM)
    assert d.wait() == 0, d.output()
    assert os.path.exists(load_config(cfg).ledger_url.removeprefix("sqlite:///"))


# --------------------------------------------------------------------------
# Lease mode: workers sharing a PostgreSQL ledger


@pytest.mark.slow
def test_on_a_shared_ledger_a_pause_holds_for_every_worker_and_reloads_update_the_rows(
    tmp_path: Path,
    servers: Callable[..., POP3TestServer],
    harness: Callable[..., Harness],
    postgres_url: str,
) -> None:
    good = servers(messages(1, 1))
    bad = servers(messages(2, 2), faults=AUTH_FAULT)
    added = servers(messages(1, 3))
    entries = [account("good", good.port), account("bad", bad.port)]
    cfg = write_config(tmp_path, entries, ledger_url=postgres_url)
    workers = [harness(cfg), harness(cfg)]  # two workers (in one process: each its own id)

    def polls(name: str) -> list[PollEvent]:
        return [e for h in workers for e in h.polls(name)]

    def wait_polls(name: str, n: int) -> list[PollEvent]:
        def enough() -> list[PollEvent] | None:
            got = polls(name)
            return got if len(got) >= n else None

        return wait_until(enough, timeout=20)

    first = wait_polls("bad", 1)[0]
    assert first.paused
    n_good = len(wait_polls("good", 1))
    wait_polls("good", n_good + 3)  # three more intervals, on either worker
    assert len(bad.sessions) == 1, "a paused account must not be retried by any worker"
    with Ledger.open(postgres_url) as ledger:
        row = ledger.lease_rows()["bad"]
        assert row.paused and row.next_poll_at is None and row.owner is None

    # SIGUSR1 to one worker: one more try, on whichever worker claims it.
    workers[1].daemon.request_poll_now()
    assert wait_polls("bad", 2)[1].paused
    assert len(bad.sessions) == 2

    # The file changes: bad's entry changed, good removed, another added.
    bad.faults = Faults()
    entries = [account("bad", bad.port, timeout=9), account("added", added.port)]
    write_config(tmp_path, entries, ledger_url=postgres_url)
    for h in workers:
        h.daemon.request_reload()
    resumed = wait_until(lambda: [e for e in polls("bad") if e.report.ok], timeout=20)[0]
    assert resumed.report.counts.fetched == 2 and not resumed.paused
    assert wait_polls("added", 1)[0].report.counts.fetched == 1
    with Ledger.open(postgres_url) as ledger:
        assert set(ledger.lease_rows()) == {"bad", "added"}
    sessions = len(good.sessions)
    wait_polls("added", len(polls("added")) + 2)
    assert len(good.sessions) == sessions, "a removed account was polled"
    assert len(bad.sessions) >= 3  # polled on schedule again, never two sessions at once
    assert good.overlaps() == bad.overlaps() == added.overlaps() == []
    for h in workers:
        h.stop()
