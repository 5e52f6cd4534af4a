"""A slow server cannot hold popsync: the pace rule of each reply, the poll's
deadline, and aborting a session from another thread.

Real conditions: the project's POP3 test server on loopback, trickling a
reply a few bytes at a time (each piece well within ``timeout``, so a
per-read timeout alone would wait for ever); real SQLite, real Maildirs, and
the ``popsync`` CLI as a real process.  Each slow case asserts the wall time
with a margin.  The bookkeeping of :class:`~popsync.pace.ReplyClock` is also
checked on its own, with a fake clock.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from popsync.config import DEFAULT_MIN_RATE, DEFAULT_POLL_TIMEOUT, load_config
from popsync.errors import TimeoutError_, TransportError
from popsync.ledger import Ledger
from popsync.pace import ReplyClock
from popsync.session import Session, SessionOptions
from popsync.sync import PollReport, run_account
from popsync.testing.faults import Faults
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import maildir_contents, stored_form, write_config

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
#: `timeout` in these tests: each piece of a trickle comes well within it.
TIMEOUT = 1.0
#: Slack for thread start-up, connect, login and a loaded machine.
MARGIN = 1.5
#: 16 bytes every 0.1 s: 160 bytes/s, far below the default min_rate.
SLOW = (16, 0.1)
#: One byte every 0.1 s: a status line of 30 bytes takes 3 s.
CRAWL = (1, 0.1)


# --------------------------------------------------------------------------
# The rule on its own


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_status_line_has_timeout_seconds_whatever_arrives() -> None:
    clock = FakeClock()
    pace = ReplyClock(3.0, 1024, clock)
    pace.begin("the greeting", stream=False)
    pace.received(500)  # bytes do not buy a status line more time
    assert pace.until() == 103.0
    clock.now = 103.5
    assert pace.too_slow() == (
        "server sent the greeting too slowly (500 bytes in 3.5 s; timeout 3 s)"
    )


def test_a_body_gets_timeout_plus_size_over_min_rate() -> None:
    clock = FakeClock()
    pace = ReplyClock(3.0, 1000, clock)
    pace.begin("RETR 3", stream=True)
    assert pace.until() == 103.0  # the grace
    pace.received(5000)
    assert pace.until() == 108.0  # + 5000 bytes / 1000 bytes/s
    clock.now = 108.5
    assert pace.too_slow() == (
        "server sent RETR 3 too slowly (5000 bytes in 8.5 s; min_rate 1000 bytes/s)"
    )


def test_the_callers_own_time_does_not_count() -> None:
    clock = FakeClock()
    pace = ReplyClock(3.0, 1000, clock)
    pace.begin("RETR 1", stream=True)
    clock.now += 1.0
    pace.pause()  # the caller writes a piece to disk ...
    clock.now += 50.0
    pace.resume()  # ... for 50 s: not the server's fault
    assert pace.until() == 153.0
    pace.done()
    assert not pace.running
    pace.begin("the reply to RETR 2", stream=False)
    assert pace.until() == clock.now + 3.0


def test_the_clock_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        ReplyClock(0, 1024)
    with pytest.raises(ValueError):
        ReplyClock(1, 0)


# --------------------------------------------------------------------------
# Polls against a trickling server


@pytest.fixture
def servers() -> Iterator[Callable[..., POP3TestServer]]:
    started: list[POP3TestServer] = []

    def start(msgs: list[bytes], **kw: Any) -> POP3TestServer:
        server = POP3TestServer(MailStore(msgs), **kw).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def poll(tmp: Path, server: POP3TestServer, **account: Any) -> tuple[PollReport, float]:
    """One run_account of a fresh account on *server*: (report, wall seconds)."""
    cfg = write_config(tmp, [{"name": "a", "port": server.port, "timeout": TIMEOUT, **account}])
    config = load_config(cfg)
    ledger = Ledger.open(config.ledger_url)
    try:
        started = time.monotonic()
        report = run_account(config.accounts[0], ledger, config.state_dir)
        return report, time.monotonic() - started
    finally:
        ledger.close()


def cli_sync(config: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "popsync", "-c", str(config), "sync", "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done, time.monotonic() - started


def assert_untouched(server: POP3TestServer, count: int) -> None:
    """The session ended without QUIT, so the server deleted nothing (RFC 1939 §6)."""
    (record,) = server.wait_for_sessions(1)
    assert not record.quit_received
    assert len(server.store) == count


# Each place trickles one reply; the expected error names what was slow.  A
# status line (greeting, the +OK to CAPA) must be whole within `timeout`; a
# listing or a body must keep min_rate after that grace.
SLOW_REPLIES = [
    pytest.param("GREETING", CRAWL, 1, "server sent the greeting too slowly", id="greeting"),
    pytest.param("CAPA", CRAWL, 1, "server sent the reply to CAPA too slowly", id="capa"),
    pytest.param("UIDL", SLOW, 300, "server sent the UIDL listing too slowly", id="uidl"),
    pytest.param("RETR", SLOW, 1, "server sent RETR 1 too slowly", id="retr"),
]


@pytest.mark.parametrize(("place", "trickle", "count", "expected"), SLOW_REPLIES)
def test_a_trickled_reply_is_cut_within_its_deadline(
    tmp_path: Path,
    servers: Callable[..., POP3TestServer],
    place: str,
    trickle: tuple[int, float],
    count: int,
    expected: str,
) -> None:
    msgs = list(generate_messages(count, 20_000 if place == "RETR" else 300, seed=1))
    srv = servers(msgs, faults=Faults(trickle={place: trickle}))
    report, seconds = poll(tmp_path, srv, delete_after_days=0)
    # The rate rule cuts a 160 bytes/s stream at timeout * 1024 / (1024 - 160).
    assert seconds < TIMEOUT * 1.2 + MARGIN, f"took {seconds:.1f} s"
    assert not report.ok and report.temporary is True
    assert report.error is not None
    assert expected in report.error, report.error
    assert "\n" not in report.error
    assert_untouched(srv, count)


def test_a_trickled_body_through_the_cli_is_one_line_and_a_rerun_fetches_it(
    tmp_path: Path, servers: Callable[..., POP3TestServer]
) -> None:
    msgs = list(generate_messages(2, 50_000, seed=2))
    srv = servers(msgs, faults=Faults(trickle={"RETR": SLOW}))
    cfg = write_config(
        tmp_path, [{"name": "a", "port": srv.port, "timeout": TIMEOUT, "delete_after_days": 0}]
    )
    done, seconds = cli_sync(cfg)
    assert seconds < TIMEOUT * 1.2 + MARGIN + 1.0, f"took {seconds:.1f} s"  # + start-up
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert line.startswith("popsync: a: FAILED (temporary): 127.0.0.1:"), line
    assert "server sent RETR 1 too slowly (" in line and "min_rate 1024 bytes/s)" in line
    assert_untouched(srv, 2)

    srv.faults = Faults()
    done, _ = cli_sync(cfg)
    assert done.returncode == 0, done.stderr
    contents = maildir_contents(load_config(cfg).accounts[0].maildir)
    assert contents == {stored_form(m): 1 for m in msgs}
    assert len(srv.store) == 0


def test_a_slow_but_honest_link_is_never_cut(
    tmp_path: Path, servers: Callable[..., POP3TestServer]
) -> None:
    # 20 KB/s, as a poor mobile link, for three times `timeout`.
    msgs = list(generate_messages(1, 60_000, seed=3))
    srv = servers(msgs, faults=Faults(trickle={"RETR": (2048, 0.1)}))
    report, seconds = poll(tmp_path, srv)
    assert report.ok, report.error
    assert seconds > 2.5  # it really was slow
    assert report.counts.fetched == 1


def test_poll_timeout_abandons_the_session_without_quit(
    tmp_path: Path, servers: Callable[..., POP3TestServer]
) -> None:
    # With min_rate 1 the trickle keeps the pace rule; only the poll's
    # deadline can end it.
    msgs = list(generate_messages(3, 20_000, seed=4))
    srv = servers(msgs, faults=Faults(trickle={"RETR": SLOW}))
    report, seconds = poll(tmp_path, srv, poll_timeout=2, min_rate=1, delete_after_days=0)
    assert seconds < 2 + MARGIN, f"took {seconds:.1f} s"
    assert not report.ok and report.temporary is True
    assert report.error == "poll took longer than poll_timeout (2 s); abandoned"
    assert_untouched(srv, 3)


def test_poll_timeout_through_the_cli(
    tmp_path: Path, servers: Callable[..., POP3TestServer]
) -> None:
    msgs = list(generate_messages(300, 300, seed=5))
    srv = servers(msgs, faults=Faults(trickle={"UIDL": SLOW}))
    account = {"name": "a", "port": srv.port, "timeout": TIMEOUT, "poll_timeout": "2s"}
    cfg = write_config(tmp_path, [{**account, "min_rate": 1}])
    done, seconds = cli_sync(cfg)
    assert seconds < 2 + MARGIN + 1.0, f"took {seconds:.1f} s"  # + start-up
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "popsync: a: FAILED (temporary): poll took longer than poll_timeout (2 s); abandoned"
    ]
    assert_untouched(srv, 300)


# --------------------------------------------------------------------------
# Aborting from another thread


def session_options(server: POP3TestServer, **kw: Any) -> SessionOptions:
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": server.port,
        "username": "user",
        "tls": "none",
        "allow_plaintext": True,
        "timeout": 30.0,
    }
    return SessionOptions(**{**base, **kw})


@pytest.mark.parametrize("tls", ["none", "implicit"])
def test_abort_from_another_thread_wakes_a_blocked_read(
    tls: str,
    servers: Callable[..., POP3TestServer],
    server_ssl_context: ssl.SSLContext,
    ca_file: Path,
) -> None:
    # The greeting never comes (within the test); the reader blocks for up to 30 s.
    kw: dict[str, Any] = {"faults": Faults(stall={"GREETING": 30})}
    if tls == "implicit":
        kw |= {"tls": "implicit", "ssl_context": server_ssl_context}
    srv = servers([], **kw)
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    opts = session_options(srv, tls=tls, ssl_context=client_ctx if tls != "none" else None)
    opened = threading.Event()
    sessions: list[Session] = []
    outcome: list[BaseException] = []

    def register(session: Session) -> None:
        sessions.append(session)
        opened.set()

    def run() -> None:
        try:
            Session.open(opts, on_open=register)
        except BaseException as exc:  # the test inspects it
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    assert opened.wait(10)
    started = time.monotonic()
    sessions[0].abort(TimeoutError_("cut off by the test"))
    worker.join(5)
    assert not worker.is_alive()
    assert time.monotonic() - started < 1.0
    (error,) = outcome
    assert isinstance(error, TimeoutError_) and str(error) == "cut off by the test"
    with pytest.raises(TransportError):  # closed by its own thread: every call fails
        sessions[0].transport.send(b"NOOP\r\n")


def test_abort_before_the_session_is_used_fails_its_first_read(
    servers: Callable[..., POP3TestServer],
) -> None:
    srv = servers([])

    def abort_at_once(session: Session) -> None:
        session.abort(TimeoutError_("too late"))

    started = time.monotonic()
    with pytest.raises(TransportError, match="too late"):
        Session.open(session_options(srv), on_open=abort_at_once)
    assert time.monotonic() - started < 5.0


# --------------------------------------------------------------------------
# The keys, as `popsync check` sees them


def check(tmp: Path, **account: Any) -> subprocess.CompletedProcess[str]:
    (tmp / "pw").write_text("secret\n")
    (tmp / "pw").chmod(0o600)
    entry = {
        "name": "home",
        "host": "pop.example.org",
        "username": "alice",
        "password_file": "pw",
        "maildir": "Mail",
        **account,
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump({"accounts": [entry]}))
    path.chmod(0o600)
    return subprocess.run(
        [sys.executable, "-m", "popsync", "-c", str(path), "check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_check_accepts_the_new_keys(tmp_path: Path) -> None:
    done = check(tmp_path, poll_timeout="2h", min_rate="20K", timeout="90s")
    assert done.returncode == 0, done.stderr
    assert "OK (1 account(s): home)" in done.stdout


@pytest.mark.parametrize(
    ("account", "line"),
    [
        ({"timeout": 10, "poll_timeout": 5}, "poll_timeout: must be at least timeout (10 s)"),
        ({"poll_timeout": 0}, "poll_timeout: must be more than 0 seconds"),
        ({"poll_timeout": "soon"}, "poll_timeout: must be seconds or a duration such as 90s"),
        ({"min_rate": 0}, "min_rate: must be at least 1"),
        ({"min_rate": "fast"}, "min_rate: must be a number of bytes, optionally with K, M or G"),
        ({"min_rate": True}, "min_rate: must be a whole number, not true/false"),
    ],
)
def test_check_rejects_bad_values_with_one_line(
    tmp_path: Path, account: dict[str, Any], line: str
) -> None:
    done = check(tmp_path, **account)
    assert done.returncode == 2
    (got,) = done.stderr.splitlines()
    assert got.startswith(f"popsync: {tmp_path / 'config.yaml'}: account 'home': {line}"), got


def test_defaults_and_a_long_timeout_raises_the_poll_timeout(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, [{"name": "a", "port": 110}])
    a = load_config(cfg).accounts[0]
    assert (a.poll_timeout, a.min_rate) == (DEFAULT_POLL_TIMEOUT, DEFAULT_MIN_RATE) == (3600, 1024)
    cfg = write_config(tmp_path, [{"name": "a", "port": 110, "timeout": "2h"}])
    assert load_config(cfg).accounts[0].poll_timeout == 7200
