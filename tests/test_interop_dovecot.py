"""Interop: popsync's session and sync engine against a real Dovecot POP3 server.

The server is Debian's ``dovecot-pop3d``, started by ``tests/dovecot_fixtures.py``
on loopback with the test CA's certificate: plain POP3 (with STLS) on one port,
implicit TLS on another.  Every test gets a fresh Dovecot user.

What "matches what Dovecot holds" means here, so that no expectation is
computed by popsync itself:

* message content comes from the files in the user's Maildir on the server
  (``Mailbox.stored_messages()``, in delivery order = UID order);
* UIDL values come from Dovecot's own ``dovecot-uidlist`` (UID and
  UIDVALIDITY), formatted as the harness pins them (``%08Xu%08Xv``: eight hex
  digits each; Dovecot writes lower case, so they are compared case-blind);
* LIST sizes are the files' sizes with every bare LF counted as CRLF (RFC 1939 §11);
* what Dovecot did (login mechanism, TLS, how a session ended) comes from its log.

A few checks need to see what popsync wrote on the wire (which SASL mechanism
``auth: auto`` chose).  Over TLS no proxy can see that, so :class:`Wiretap`
records each ``Transport.send`` call and passes it on unchanged: Dovecot still
gets every byte.  Nothing in here fakes a server.
"""

from __future__ import annotations

import base64
import secrets
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from popsync.cli import main as cli_main
from popsync.config import Account, Config
from popsync.errors import SecurityError, ServerError, TlsModeMismatch
from popsync.ledger import Ledger
from popsync.options import TlsMode
from popsync.pop3 import (
    NEED_DATA,
    BodyData,
    Command,
    EndOfBody,
    Err,
    Event,
    Listing,
    Ok,
    Rset,
    Stat,
    Top,
)
from popsync.session import RetrRequest, Session, SessionOptions
from popsync.sync import PollReport, run_account
from popsync.testing.samples import generate_messages, sample_messages
from popsync.transport import make_ssl_context
from tests.dovecot_fixtures import require_dovecot
from tests.helpers import (
    Collect,
    delete,
    digest,
    load,
    maildir_contents,
    stored_form,
    wait_until,
    write_config,
)
from tests.servers.dovecot import Dovecot, Mailbox

pytestmark = [pytest.mark.dovecot, pytest.mark.timeout(120)]

#: The three ways in, as the config spells them; ``none`` is shown as "plain".
MODES = ["none", "starttls", "implicit"]
MODE_IDS = ["plain", "starttls", "implicit"]
TLS_MODES = ["starttls", "implicit"]

#: Shapes a POP3 path must carry besides the realistic samples: no final line
#: end (Dovecot adds CRLF on the wire but not in LIST), stored CRLF, a bare CR
#: that is not a line end, an empty body.
EDGE_MESSAGES = [
    b"Subject: no final newline\n\nthe last line has no end",
    b"Subject: stored with CRLF\r\n\r\nbody line\r\n.dot line\r\n",
    b"Subject: bare CR\n\nbefore\rafter\n",
    b"Subject: empty body\n\n",
]


#: About 3 MB: many socket reads, many BodyData pieces, several TLS records.
BIG_MESSAGE = b"Subject: big\n\n" + b"".join(b"%07d " % i + b"z" * 90 + b"\n" for i in range(30000))


def messages_for_session() -> list[bytes]:
    return [*sample_messages(), *EDGE_MESSAGES, BIG_MESSAGE]


# ------------------------------------------------------------------ helpers


@pytest.fixture
def client_ctx(ca_file: Path) -> ssl.SSLContext:
    """A verifying client context that trusts the test CA (as ``ca_file:`` does)."""
    return make_ssl_context(ca_file)


def port_for(mailbox: Mailbox, tls: str) -> int:
    return mailbox.pop3s_port if tls == "implicit" else mailbox.pop3_port


def open_session(mailbox: Mailbox, tls: str, ctx: ssl.SSLContext | None, **kw: Any) -> Session:
    options: dict[str, Any] = {
        "host": mailbox.host,
        "port": port_for(mailbox, tls),
        "username": mailbox.user,
        "tls": tls,
        "ssl_context": None if tls == "none" else ctx,
        "allow_plaintext": tls == "none",
        "timeout": 10.0,
    }
    options.update(kw)
    return Session.open(SessionOptions(**options))


def login(mailbox: Mailbox, tls: str, ctx: ssl.SSLContext | None, **kw: Any) -> Session:
    session = open_session(mailbox, tls, ctx, **kw)
    try:
        session.login(mailbox.password)
    except BaseException:
        session.abort()
        raise
    return session


def exchange(session: Session, command: Command) -> list[Event]:
    """Send one command on its own and return every event of its reply.

    For commands the session has no method for (TOP, RSET, STAT); uses only
    the session's public connection and transport.
    """
    conn, transport = session.conn, session.transport
    transport.send(conn.send(command))
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            conn.receive_data(transport.recv())
            continue
        assert not isinstance(event, type(NEED_DATA))
        events.append(event)
        if isinstance(event, Err | EndOfBody | Listing):
            return events
        if isinstance(event, Ok) and not command.multiline():
            return events


def fetch_all(
    session: Session, msgs: list[int], on_started: Callable[[int], None] | None = None
) -> tuple[dict[int, bytes], dict[int, int]]:
    """RETR *msgs* (pipelined when on); returns bodies and their wire octet counts."""
    sink = Collect(on_started=on_started)
    session.retrieve((RetrRequest(m) for m in msgs), sink)
    assert sink.refusals == {}
    return sink.got(), sink.octets


def virtual_size(data: bytes) -> int:
    """RFC 1939 §11 size of a stored message: every bare LF counts as CRLF."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


def dovecot_holdings(mailbox: Mailbox) -> list[tuple[bytes, bytes]]:
    """(UIDL, message bytes) for each message Dovecot holds, in UID order.

    Read from Dovecot's own files: ``dovecot-uidlist`` (header ``3 V<uidvalidity>
    ...``, then ``<uid> [extensions] :<base name>``) and the Maildir.  Dovecot
    writes the uidlist when a session first sees the files, so call this after
    a session.
    """
    maildir = mailbox.maildir
    header, *entries = (maildir / "dovecot-uidlist").read_text("ascii").splitlines()
    fields = header.split()
    assert fields[0] == "3", f"unknown uidlist version: {header!r}"
    validity = int(next(f[1:] for f in fields[1:] if f.startswith("V")))
    files = {
        p.name.split(":", 1)[0]: p for sub in ("new", "cur") for p in (maildir / sub).iterdir()
    }
    held = []
    for entry in entries:
        head, _, name = entry.partition(" :")
        if name in files:
            uid = int(head.split()[0])
            held.append((f"{uid:08X}{validity:08X}".encode(), files[name].read_bytes()))
    return held


def log_lines(dovecot: Dovecot, needle: str) -> list[str]:
    text = dovecot.log_file.read_text("utf-8", "replace")
    return [line for line in text.splitlines() if needle in line]


def wait_for_log(
    dovecot: Dovecot, *needles: str, count: int = 1, timeout: float = 10.0
) -> list[str]:
    """Wait until *count* log lines contain every one of *needles*; return them.

    Dovecot writes its log through a separate process, so lines lag a little.
    """

    def found() -> list[str] | None:
        lines = [line for line in log_lines(dovecot, needles[0]) if all(n in line for n in needles)]
        return lines if len(lines) >= count else None

    return wait_until(
        found, timeout=timeout, what=lambda: f"{needles!r} in the log:\n{dovecot.log_tail()}"
    )


def wait_session_end(mailbox: Mailbox, count: int = 1) -> list[str]:
    """The "Disconnected" lines of the user's mail sessions, once *count* are logged."""
    return wait_for_log(mailbox.server, f"pop3({mailbox.user})", "Disconnected", count=count)


class Wiretap:
    """Records each ``send`` of a session's transport -- with whether TLS was on --
    and passes it on unchanged, so Dovecot still receives every byte."""

    def __init__(self, session: Session) -> None:
        self.sent: list[tuple[bool, bytes]] = []
        transport = session.transport
        real_send = transport.send

        def send(data: bytes) -> None:
            self.sent.append((transport.is_tls, data))
            real_send(data)

        transport.send = send  # type: ignore[method-assign]

    def lines(self) -> list[tuple[bool, bytes]]:
        return [(tls, line) for tls, data in self.sent for line in data.splitlines()]


# ------------------------------------------------------- session: logging in


@pytest.mark.parametrize("auth", ["auto", "user", "plain", "login"])
@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
def test_login_methods(
    dovecot_mailbox: Mailbox, client_ctx: ssl.SSLContext, tls: str, auth: str
) -> None:
    mailbox = dovecot_mailbox
    mailbox.add_messages(sample_messages()[:2])
    session = open_session(mailbox, tls, client_ctx, auth=auth)
    assert session.secure == (tls != "none")
    # RFC 2595 §4: STLS is offered in clear and no longer once TLS is on; the
    # session must hold the post-TLS CAPA.
    assert session.capabilities.has("STLS") == (tls == "none")
    tap = Wiretap(session)
    session.login(mailbox.password)
    (stat,) = exchange(session, Stat())
    assert isinstance(stat, Ok) and stat.text.split()[0] == b"2"
    session.quit()

    sent = tap.lines()
    assert all(on_tls == (tls != "none") for on_tls, _ in sent)
    first = sent[0][1]
    user, password = mailbox.user.encode(), mailbox.password.encode()
    if auth in ("auto", "plain"):
        # auto prefers SASL PLAIN, which Dovecot offers (RFC 4616: authzid NUL authcid NUL pw).
        assert first.startswith(b"AUTH PLAIN ")
        assert base64.b64decode(first.split()[2]) == b"\0" + user + b"\0" + password
        mechanism = "PLAIN"
    elif auth == "user":
        assert [line for _, line in sent[:2]] == [b"USER " + user, b"PASS " + password]
        mechanism = "PLAIN"  # Dovecot logs USER/PASS as PLAIN
    else:
        # AUTH LOGIN: the user name and password each answer a challenge.
        assert [line for _, line in sent[:3]] == [
            b"AUTH LOGIN",
            base64.b64encode(user),
            base64.b64encode(password),
        ]
        mechanism = "LOGIN"
    (logged,) = wait_for_log(mailbox.server, f"Login: user=<{mailbox.user}>")
    assert f"method={mechanism}," in logged
    assert ("TLS" in logged.split("session=")[0]) == (tls != "none")
    assert "Logged out" in wait_session_end(mailbox)[0]


@pytest.mark.parametrize(
    ("tls", "auth"), [("none", "user"), ("starttls", "login"), ("implicit", "auto")]
)
def test_wrong_password_is_a_permanent_auth_error(
    dovecot_mailbox: Mailbox, client_ctx: ssl.SSLContext, tls: str, auth: str
) -> None:
    session = open_session(dovecot_mailbox, tls, client_ctx, auth=auth)
    with pytest.raises(ServerError) as info:
        session.login(dovecot_mailbox.password + "x")
    session.abort()
    # Dovecot answers "-ERR [AUTH] ..." (RFC 3206 §5): fix the config, do not retry.
    assert info.value.code is not None and info.value.code.top == "AUTH"
    assert info.value.temporary is False


@pytest.mark.parametrize("auth", ["user", "plain", "login"])
def test_password_with_spaces_and_utf8(
    dovecot: Dovecot, client_ctx: ssl.SSLContext, auth: str
) -> None:
    # RFC 1939 §7 lets PASS carry spaces; SASL carries UTF-8 (RFC 4616 §2).
    user = f"sp{secrets.token_hex(4)}"
    dovecot.add_user(user, "pa ss wörd €")
    mailbox = Mailbox(dovecot, user)
    with login(mailbox, "implicit", client_ctx, auth=auth) as session:
        assert (session.uidl(), session.scan()) == ([], [])
        session.quit()


def test_wrong_port_for_the_tls_mode_fails_cleanly(
    dovecot_mailbox: Mailbox, client_ctx: ssl.SSLContext
) -> None:
    mailbox = dovecot_mailbox
    # Implicit TLS to the plain port: the greeting is not a TLS record.
    with pytest.raises(TlsModeMismatch, match="speaks plain POP3: use tls: starttls"):
        Session.open(
            SessionOptions(
                host=mailbox.host,
                port=mailbox.pop3_port,
                username=mailbox.user,
                tls=TlsMode.IMPLICIT,
                ssl_context=client_ctx,
                timeout=5.0,
            )
        )
    # STLS to the pop3s port: the server waits for a handshake, popsync for a
    # greeting; after a silent timeout a probe finds the port speaks TLS.
    started = time.monotonic()
    with pytest.raises(TlsModeMismatch, match="expects TLS at once: use tls: implicit"):
        open_session(mailbox, "starttls", client_ctx, port=mailbox.pop3s_port, timeout=1.0)
    assert time.monotonic() - started < 5.0


# ------------------------------------------------------ session: mail data


@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
def test_listings_match_what_dovecot_holds(
    dovecot_mailbox: Mailbox, client_ctx: ssl.SSLContext, tls: str
) -> None:
    mailbox = dovecot_mailbox
    messages = messages_for_session()
    mailbox.add_messages(messages)
    with login(mailbox, tls, client_ctx) as session:
        uids, sizes = session.uidl(), session.scan()
        session.quit()
    held = dovecot_holdings(mailbox)
    assert [data for _, data in held] == messages
    numbers = list(range(1, len(messages) + 1))
    assert [n for n, _ in uids] == numbers
    assert [uid.upper() for _, uid in uids] == [uid for uid, _ in held]
    assert sizes == list(zip(numbers, map(virtual_size, messages), strict=True))

    # RFC 1939 §7: unique-ids persist across sessions; a new message gets a new one.
    mailbox.add_message(b"Subject: later\n\nlater\n")
    with login(mailbox, tls, client_ctx) as session:
        again = session.uidl()
        session.quit()
    assert again[: len(uids)] == uids
    assert again[-1][1] not in {uid for _, uid in uids}


@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
def test_retr_is_byte_exact(dovecot_mailbox: Mailbox, client_ctx: ssl.SSLContext, tls: str) -> None:
    mailbox = dovecot_mailbox
    mailbox.add_messages(messages_for_session())
    with login(mailbox, tls, client_ctx) as session:
        sizes = session.scan()
        bodies, octets = fetch_all(session, [n for n, _ in sizes])
        session.quit()
    held = mailbox.stored_messages()
    assert [bodies[n] for n in sorted(bodies)] == [stored_form(m) for m in held]
    # What arrived is what Dovecot counts: LIST size, plus the CRLF Dovecot
    # adds to a message whose last line has no end.
    for (n, size), data in zip(sizes, held, strict=True):
        assert octets[n] == size + (0 if data.endswith(b"\n") else 2)
    assert f"retr={len(held)}/" in wait_session_end(mailbox)[0]


@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
def test_top_zero_returns_the_headers(
    dovecot_mailbox: Mailbox, client_ctx: ssl.SSLContext, tls: str
) -> None:
    mailbox = dovecot_mailbox
    mailbox.add_messages(messages_for_session())
    held = mailbox.stored_messages()
    with login(mailbox, tls, client_ctx) as session:
        for n, data in enumerate(held, start=1):
            events = exchange(session, Top(n, 0))
            assert isinstance(events[0], Ok) and isinstance(events[-1], EndOfBody)
            header = b"".join(e.data for e in events if isinstance(e, BodyData))
            # RFC 1939 §7: the header, the blank line after it, and no body line.
            head, sep, _ = stored_form(data).partition(b"\n\n")
            assert sep and header == head + b"\n\n"
        session.quit()
    assert f"top={len(held)}/" in wait_session_end(mailbox)[0]


# ------------------------------------------------ session: DELE and UPDATE


@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
def test_dele_rset_quit_deletes_nothing(
    dovecot_mailbox: Mailbox, client_ctx: ssl.SSLContext, tls: str
) -> None:
    mailbox = dovecot_mailbox
    messages = sample_messages()
    mailbox.add_messages(messages)
    with login(mailbox, tls, client_ctx) as session:
        assert delete(session, [1, 2, 5]) == {1: None, 2: None, 5: None}
        stat = exchange(session, Stat())[0]
        assert isinstance(stat, Ok) and stat.text.split()[0] == b"%d" % (len(messages) - 3)
        (rset,) = exchange(session, Rset())  # RFC 1939 §5: unmark every DELEd message
        assert isinstance(rset, Ok)
        stat = exchange(session, Stat())[0]
        assert isinstance(stat, Ok) and stat.text.split()[0] == b"%d" % len(messages)
        session.quit()
    assert mailbox.stored_messages() == messages
    assert "del=0/" in wait_session_end(mailbox)[0]


@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
def test_dele_then_quit_deletes(
    dovecot_mailbox: Mailbox, client_ctx: ssl.SSLContext, tls: str
) -> None:
    mailbox = dovecot_mailbox
    messages = sample_messages()
    mailbox.add_messages(messages)
    with login(mailbox, tls, client_ctx) as session:
        before = session.uidl()
        assert delete(session, [1, 3]) == {1: None, 3: None}
        session.quit()  # RFC 1939 §6: removal happens in UPDATE, at QUIT
    kept = [m for i, m in enumerate(messages, start=1) if i not in (1, 3)]
    assert mailbox.stored_messages() == kept
    assert "del=2/" in wait_session_end(mailbox)[0]
    with login(mailbox, tls, client_ctx) as session:
        after = session.uidl()
        session.quit()
    # Renumbered 1..n, same unique-ids for the survivors.
    assert [uid for _, uid in after] == [uid for n, uid in before if n not in (1, 3)]
    assert [n for n, _ in after] == list(range(1, len(kept) + 1))


@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
def test_dropped_connection_after_dele_deletes_nothing(
    dovecot_mailbox: Mailbox, client_ctx: ssl.SSLContext, tls: str
) -> None:
    mailbox = dovecot_mailbox
    messages = sample_messages()
    mailbox.add_messages(messages)
    session = login(mailbox, tls, client_ctx)
    before = session.uidl()
    assert delete(session, [1, 2]) == {1: None, 2: None}
    session.abort()  # no QUIT: the session never enters UPDATE (RFC 1939 §6)
    # Only look once Dovecot has finished that session.
    (ended,) = wait_session_end(mailbox)
    assert "Connection closed" in ended and "Logged out" not in ended and "del=0/" in ended
    assert mailbox.stored_messages() == messages
    with login(mailbox, tls, client_ctx) as session:
        after = session.uidl()
        session.quit()
    assert after == before


# ------------------------------------------------------- session: pipelining


@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
def test_thousand_messages_pipelined(
    dovecot_mailbox: Mailbox, client_ctx: ssl.SSLContext, tls: str
) -> None:
    mailbox = dovecot_mailbox
    mailbox.add_messages(generate_messages(1000, 2000, seed=11))
    in_flight: list[int] = []
    with login(mailbox, tls, client_ctx, pipeline_window=32) as session:
        assert session.capabilities.pipelining  # Dovecot advertises PIPELINING
        assert session.conn.pipelining  # ... and the session turned it on
        uids, sizes = session.uidl(), session.scan()
        assert len(uids) == len(sizes) == 1000

        def watch(_: int) -> None:
            in_flight.append(len(session.conn.pending))

        bodies, _ = fetch_all(session, [n for n, _ in uids], on_started=watch)
        session.quit()
    # Many RETRs really were outstanding at once, not one at a time.
    assert max(in_flight) > 1
    held = mailbox.stored_messages()
    assert len(held) == len(bodies) == 1000
    assert all(bodies[n] == stored_form(data) for n, data in enumerate(held, start=1))
    assert "retr=1000/" in wait_session_end(mailbox)[0]


# -------------------------------------------------------- certificate checks


def no_auth_disconnects(dovecot: Dovecot) -> int:
    """Connections the login process closed without any authentication attempt."""
    return len(log_lines(dovecot, "(no auth attempts"))


@pytest.mark.parametrize("tls", TLS_MODES)
def test_untrusted_certificate_refused_before_credentials(
    dovecot: Dovecot, dovecot_mailbox: Mailbox, tls: str
) -> None:
    mailbox = dovecot_mailbox
    untrusting = make_ssl_context(None)  # the system store: it knows no test CA
    seen = no_auth_disconnects(dovecot)
    with pytest.raises(SecurityError, match="certificate"):
        open_session(mailbox, tls, untrusting)
    # Dovecot saw the connection end with no authentication attempt at all.
    wait_for_log(dovecot, "(no auth attempts", count=seen + 1)
    assert not log_lines(dovecot, f"user=<{mailbox.user}>")


def test_stls_on_a_server_without_certificate_is_refused(
    tmp_path: Path, client_ctx: ssl.SSLContext
) -> None:
    require_dovecot()
    with Dovecot(tmp_path / "dv", users={"alice": "secret"}) as server:
        mailbox = Mailbox(server, "alice")
        mailbox.add_message(sample_messages()[0])
        seen = no_auth_disconnects(server)  # the harness's start probe
        with pytest.raises(SecurityError, match="STLS"):
            open_session(mailbox, "starttls", client_ctx)
        wait_for_log(server, "(no auth attempts", count=seen + 1)
        assert not log_lines(server, "user=<alice>")
        assert server.stored_messages("alice") == [sample_messages()[0]]


# ---------------------------------------------------------- sync end to end


class SyncEnv:
    """One popsync account on one Dovecot user: a real config file, ledger and Maildir."""

    def __init__(self, tmp: Path, mailbox: Mailbox, ca_file: Path, tls: str, **extra: Any) -> None:
        self.mailbox = mailbox
        account: dict[str, Any] = {
            "name": "dove",
            "tls": tls,
            "port": port_for(mailbox, tls),
            "username": mailbox.user,
            "secret": mailbox.password,
            **extra,
        }
        if tls != "none":
            account["ca_file"] = str(ca_file)
        self.config_path = write_config(tmp, [account])
        self.config: Config = load(self.config_path)
        self.account: Account = self.config.accounts[0]
        self.maildir = self.account.maildir
        self._ledger: Ledger | None = None

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = Ledger.open(self.config.ledger_url)
        return self._ledger

    def poll(self) -> PollReport:
        return run_account(self.account, self.ledger, self.config.state_dir)

    def cli_sync(self) -> int:
        return cli_main(["-c", str(self.config_path), "sync", "--no-progress"])

    def expect_maildir_holds(self, sources: list[bytes]) -> None:
        """Each source message stored once, byte-identical to its stored form (I2, I5)."""
        assert maildir_contents(self.maildir) == Counter(stored_form(m) for m in sources)

    def expect_ledger_matches(self, held: list[tuple[bytes, bytes]], state: str) -> None:
        """Every UID Dovecot had is in the ledger with the digest of *its* message."""
        rows = {uid.upper(): row for (uid, _), row in self.ledger.rows("dove").items()}
        assert set(rows) == {uid for uid, _ in held}
        for uid, data in held:
            row = rows[uid]
            assert row.state == state
            assert row.sha256 == digest(stored_form(data))
            assert row.stored_size == len(stored_form(data))

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()


@pytest.fixture
def make_sync(
    tmp_path: Path, dovecot_mailbox: Mailbox, ca_file: Path
) -> Iterator[Callable[..., SyncEnv]]:
    made: list[SyncEnv] = []

    def factory(tls: str, **extra: Any) -> SyncEnv:
        env = SyncEnv(tmp_path, dovecot_mailbox, ca_file, tls, **extra)
        made.append(env)
        return env

    yield factory
    for env in made:
        env.close()


@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
def test_sync_mirror_then_nothing_then_only_new(
    make_sync: Callable[..., SyncEnv], tls: str
) -> None:
    env = make_sync(tls)
    messages = list(generate_messages(500, 2000, seed=21))
    env.mailbox.add_messages(messages)

    first = env.poll()
    assert first.ok, first.error
    assert (first.counts.listed, first.counts.new, first.counts.fetched) == (500, 500, 500)
    assert first.counts.deleted == 0
    env.expect_maildir_holds(messages)
    held = dovecot_holdings(env.mailbox)
    assert [data for _, data in held] == messages  # mirror: Dovecot keeps it all
    env.expect_ledger_matches(held, "delivered")

    again = env.poll()
    assert again.ok, again.error
    assert (again.counts.listed, again.counts.new, again.counts.fetched) == (500, 0, 0)
    assert "retr=0/" in wait_session_end(env.mailbox, count=2)[1]

    # New mail of awkward shapes, and one body far larger than a socket read.
    newer = [*generate_messages(7, 900, seed=22), *EDGE_MESSAGES, BIG_MESSAGE]
    env.mailbox.add_messages(newer)
    third = env.poll()
    assert third.ok, third.error
    n = len(newer)
    assert (third.counts.listed, third.counts.new, third.counts.fetched) == (500 + n, n, n)
    env.expect_maildir_holds(messages + newer)
    # Dovecot served exactly the new messages in that session.
    assert f"retr={n}/" in wait_session_end(env.mailbox, count=3)[2]
    held = dovecot_holdings(env.mailbox)
    assert [data for _, data in held] == messages + newer
    env.expect_ledger_matches(held, "delivered")


@pytest.mark.parametrize("tls", MODES, ids=MODE_IDS)
def test_cli_sync_delete_after_delivery_empties_dovecot(
    make_sync: Callable[..., SyncEnv],
    client_ctx: ssl.SSLContext,
    capsys: pytest.CaptureFixture[str],
    tls: str,
) -> None:
    env = make_sync(tls, delete_after_days=0)
    messages = list(generate_messages(300, 2000, seed=31))
    env.mailbox.add_messages(messages)
    # One listing session first, so Dovecot assigns UIDs we can read back
    # before the sync deletes the files.
    with login(env.mailbox, tls, client_ctx) as session:
        session.uidl()
        session.quit()
    held = dovecot_holdings(env.mailbox)

    assert env.cli_sync() == 0
    out = capsys.readouterr().out
    assert "300 on server, 300 new, 300 fetched" in out and "300 deleted" in out
    assert env.mailbox.stored_messages() == []
    env.expect_maildir_holds(messages)
    env.expect_ledger_matches(held, "deleted")

    newer = [*generate_messages(5, 700, seed=32), *EDGE_MESSAGES]
    env.mailbox.add_messages(newer)
    assert env.cli_sync() == 0
    n = len(newer)
    assert f"{n} on server, {n} new, {n} fetched" in capsys.readouterr().out
    assert env.mailbox.stored_messages() == []
    env.expect_maildir_holds(messages + newer)

    assert env.cli_sync() == 0
    assert "0 on server, 0 new, 0 fetched" in capsys.readouterr().out


def test_oversized_message_skipped_and_left_on_dovecot(
    make_sync: Callable[..., SyncEnv], capsys: pytest.CaptureFixture[str]
) -> None:
    env = make_sync("implicit", delete_after_days=0, max_message_size=1_000_000)
    small = sample_messages()
    env.mailbox.add_messages([*small[:3], BIG_MESSAGE, *small[3:]])
    assert env.cli_sync() == 0  # a skip by policy is not a failure (docs/design.md §5)
    assert "1 skipped" in capsys.readouterr().out
    env.expect_maildir_holds(small)
    # Only what was stored was deleted: the big message waits on the server.
    assert env.mailbox.stored_messages() == [BIG_MESSAGE]
    assert env.poll().counts.fetched == 0
    assert env.mailbox.stored_messages() == [BIG_MESSAGE]


def test_sync_with_wrong_password_fails_and_changes_nothing(
    make_sync: Callable[..., SyncEnv], capsys: pytest.CaptureFixture[str]
) -> None:
    env = make_sync("starttls", delete_after_days=0, secret="not-the-password")
    env.mailbox.add_messages(sample_messages())
    assert env.cli_sync() == 1
    err = capsys.readouterr().err
    assert "dove: FAILED (needs attention)" in err and "[AUTH]" in err
    report = env.poll()
    assert not report.ok and report.temporary is False
    assert maildir_contents(env.maildir) == Counter()
    assert env.mailbox.stored_messages() == sample_messages()


# ------------------------------------------------------------------ larger


@pytest.mark.slow
def test_five_thousand_messages_exactly_once_over_implicit_tls(
    make_sync: Callable[..., SyncEnv], record_property: Callable[[str, object], None]
) -> None:
    env = make_sync("implicit")
    messages = list(generate_messages(5000, 2048, seed=41))
    env.mailbox.add_messages(messages)

    started = time.monotonic()
    first = env.poll()
    seconds = time.monotonic() - started
    assert first.ok, first.error
    assert (first.counts.new, first.counts.fetched) == (5000, 5000)
    mb = first.counts.bytes / 1e6
    record_property("first_sync_seconds", round(seconds, 2))
    print(f"5000 messages, {mb:.1f} MB in {seconds:.1f} s ({5000 / seconds:.0f} msg/s)")
    env.expect_maildir_holds(messages)
    assert env.mailbox.stored_messages() == messages

    started = time.monotonic()
    again = env.poll()
    record_property("resync_seconds", round(time.monotonic() - started, 2))
    assert again.ok, again.error
    assert (again.counts.listed, again.counts.new, again.counts.fetched) == (5000, 0, 0)
    env.expect_maildir_holds(messages)
