"""The blocking session against the project's POP3 test server over real sockets."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from popsync.errors import (
    RemoteProtocolError,
    SecurityError,
    ServerError,
    TimeoutError_,
    TransportError,
)
from popsync.options import TlsMode
from popsync.session import RetrRequest, Session, SessionOptions
from popsync.testing.faults import Faults
from popsync.testing.mailstore import MailStore, to_crlf
from popsync.testing.samples import generate_messages, sample_messages
from popsync.testing.server import POP3TestServer
from popsync.transport import make_ssl_context
from tests.helpers import Collect, delete

pytestmark = pytest.mark.timeout(60)


def stored_form(data: bytes) -> bytes:
    """What popsync stores for a message the server holds: LF line ends, final LF."""
    return to_crlf(data).replace(b"\r\n", b"\n")


def fetch_all(session: Session, msgs: list[int]) -> dict[int, bytes]:
    sink = Collect()
    session.retrieve((RetrRequest(m) for m in msgs), sink)
    assert sink.refusals == {}
    return sink.got()


@pytest.fixture
def store() -> MailStore:
    return MailStore(sample_messages())


def opts(server: POP3TestServer, **kw: object) -> SessionOptions:
    base: dict[str, object] = {
        "host": "127.0.0.1",
        "port": server.port,
        "username": "user",
        "tls": "none",
        "allow_plaintext": True,
        "timeout": 5.0,
    }
    base.update(kw)
    return SessionOptions(**base)  # type: ignore[arg-type]


@pytest.fixture
def client_ctx(ca_file: Path) -> ssl.SSLContext:
    return make_ssl_context(ca_file)


@pytest.fixture
def plain(store: MailStore) -> Iterator[POP3TestServer]:
    with POP3TestServer(store) as srv:
        yield srv


def test_plain_full_cycle_byte_exact(plain: POP3TestServer, store: MailStore) -> None:
    with Session.open(opts(plain)) as s:
        s.login("pass")
        uids, sizes = s.uidl(), s.scan()
        assert [u for _, u in uids] == store.uids()
        assert len(sizes) == len(store)
        bodies = fetch_all(s, [n for n, _ in uids])
        for (n, _), msg in zip(uids, store.messages(), strict=True):
            assert bodies[n] == stored_form(msg.data)
        assert delete(s, [1]) == {1: None}
        s.quit()
    assert plain.sessions[0].deleted == [store_uid_first(uids)]
    assert len(store) == len(sample_messages()) - 1


def store_uid_first(uids: list[tuple[int, bytes]]) -> bytes:
    return uids[0][1]


def test_dropped_connection_deletes_nothing(plain: POP3TestServer, store: MailStore) -> None:
    s = Session.open(opts(plain))
    s.login("pass")
    delete(s, [1, 2])
    s.abort()  # no QUIT: RFC 1939 §6, no UPDATE
    plain.wait_for_sessions(1)
    assert len(store) == len(sample_messages())


def test_no_credentials_without_tls_unless_allowed(plain: POP3TestServer) -> None:
    s = Session.open(opts(plain, allow_plaintext=False))
    with pytest.raises(SecurityError, match="without TLS"):
        s.login("pass")
    s.abort()
    record = plain.wait_for_sessions(1)[0]
    assert not record.sent_in_clear(b"USER") and not record.sent_in_clear(b"PASS")
    assert not record.sent_in_clear(b"AUTH")


def test_implicit_tls(
    store: MailStore, server_ssl_context: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    with POP3TestServer(store, tls="implicit", ssl_context=server_ssl_context) as srv:
        with Session.open(
            opts(srv, tls="implicit", ssl_context=client_ctx, allow_plaintext=False)
        ) as s:
            assert s.secure
            s.login("pass")
            uids = s.uidl()
            assert len(uids) == len(store)
            s.quit()
        record = srv.sessions[0]
        assert not record.credentials_in_clear
        # auto picked SASL PLAIN because the server offers it over TLS
        assert "AUTH" in record.command_names()


def test_starttls_recapa_and_no_secret_in_clear(
    store: MailStore, server_ssl_context: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    with POP3TestServer(store, ssl_context=server_ssl_context) as srv:
        with Session.open(
            opts(srv, tls="starttls", ssl_context=client_ctx, allow_plaintext=False)
        ) as s:
            s.login("pass")
            s.uidl()
            s.quit()
        record = srv.sessions[0]
        names = record.command_names()
        assert names[:3] == ["CAPA", "STLS", "CAPA"]
        assert not record.credentials_in_clear
        assert not record.sent_in_clear(b"AUTH") and not record.sent_in_clear(b"PASS")


def test_stls_injection_refused(
    store: MailStore, server_ssl_context: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    faults = Faults(inject_after_stls=b"+OK injected\r\n")
    with POP3TestServer(store, ssl_context=server_ssl_context, faults=faults) as srv:
        with pytest.raises(SecurityError, match="injection"):
            Session.open(opts(srv, tls="starttls", ssl_context=client_ctx))
        record = srv.wait_for_sessions(1)[0]
        assert record.command_names() == ["CAPA", "STLS"]


def test_stls_refused_means_stop(
    store: MailStore, server_ssl_context: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    faults = Faults(errors={"STLS": b"-ERR not today"})
    with POP3TestServer(store, ssl_context=server_ssl_context, faults=faults) as srv:
        with pytest.raises(SecurityError, match="STLS"):
            Session.open(opts(srv, tls="starttls", ssl_context=client_ctx))
        assert not srv.wait_for_sessions(1)[0].sent_in_clear(b"USER")


@pytest.mark.parametrize("case", ["wrong-host", "untrusted-ca"])
def test_untrusted_or_wrong_host_certificate_refused(
    store: MailStore, client_ctx: ssl.SSLContext, case: str
) -> None:
    if case == "wrong-host":  # a CA the client trusts, but a name it did not ask for
        ca = trustme.CA()
        cert = ca.issue_cert("wrong.example")
        ctx = make_ssl_context(None)
        ca.configure_trust(ctx)
    else:  # the right name, from a CA the client does not trust
        cert = trustme.CA().issue_cert("127.0.0.1")
        ctx = client_ctx
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    with POP3TestServer(store, tls="implicit", ssl_context=server_ctx) as srv:
        with pytest.raises(SecurityError, match="certificate"):
            Session.open(opts(srv, tls="implicit", ssl_context=ctx))
        # the handshake failed before any command: no credential left popsync
        assert all(record.commands == [] for record in srv.sessions)


@pytest.mark.parametrize("method", ["user", "plain", "apop"])
def test_each_auth_method(plain: POP3TestServer, method: str) -> None:
    # AUTH LOGIN is exercised against Dovecot (tests/test_interop_dovecot.py).
    with Session.open(opts(plain, auth=method)) as s:
        s.login("pass")
        s.uidl()
        s.quit()
    names = plain.sessions[-1].command_names()
    expected = {"user": "PASS", "plain": "AUTH", "apop": "APOP"}[method]
    assert expected in names
    assert ("APOP" in names) == (method == "apop")


def test_long_xoauth2_token_sent_as_continuation(store: MailStore) -> None:
    seen: list[bytes] = []

    def hook(state: object, line: bytes) -> bytes | None:
        seen.append(line)
        if line.startswith(b"AUTH XOAUTH2"):
            return b"+ \r\n"
        if len(seen) >= 2 and seen[-2].startswith(b"AUTH XOAUTH2"):
            return b"-ERR [AUTH] token rejected\r\n"
        return None

    with POP3TestServer(store, sasl=("XOAUTH2",), on_command=hook) as srv:
        s = Session.open(opts(srv, auth="xoauth2"))
        with pytest.raises(ServerError) as info:
            s.login("t" * 400)
        s.abort()
    assert seen[0] == b"CAPA"
    assert seen[1] == b"AUTH XOAUTH2"  # too long for the command line (RFC 5034 §4)
    assert len(seen[2]) > 255
    assert info.value.code is not None and info.value.code.top == "AUTH"
    assert info.value.temporary is False


@pytest.mark.parametrize(
    ("command", "line", "temporary"),
    [
        ("PASS", b"-ERR [AUTH] invalid credentials", False),
        ("PASS", b"-ERR [IN-USE] maildrop locked", True),
        ("PASS", b"-ERR [SYS/TEMP] try later", True),
        ("PASS", b"-ERR [SYS/PERM] account disabled", False),
        ("PASS", b"-ERR [LOGIN-DELAY] wait", True),
    ],
)
def test_resp_codes_classify(store: MailStore, command: str, line: bytes, temporary: bool) -> None:
    with POP3TestServer(store, faults=Faults(errors={command: line})) as srv:
        s = Session.open(opts(srv, auth="user"))
        with pytest.raises(ServerError) as info:
            s.login("pass")
        s.abort()
    assert info.value.temporary is temporary


def test_wrong_password_without_resp_code_is_permanent(store: MailStore) -> None:
    with POP3TestServer(store, resp_codes=False, auth_resp_code=False, password="other") as srv:
        s = Session.open(opts(srv, auth="user"))
        with pytest.raises(ServerError) as info:
            s.login("pass")
        s.abort()
    assert info.value.temporary is False


@pytest.mark.parametrize("tls", ["none", "starttls", "implicit"])
def test_thousand_messages_pipelined(
    tls: str, server_ssl_context: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    store = MailStore(generate_messages(1000, 3000, seed=1))
    server_tls = "implicit" if tls == "implicit" else "none"
    ctx = None if tls == "none" else server_ssl_context
    with POP3TestServer(store, tls=server_tls, ssl_context=ctx) as srv:  # type: ignore[arg-type]
        client = opts(srv, tls=tls, ssl_context=client_ctx, pipeline_window=50)
        with Session.open(client) as s:
            s.login("pass")
            assert s.conn.pipelining and s.secure == (tls != "none")
            uids = s.uidl()
            in_flight: list[int] = []
            sink = Collect(on_started=lambda _: in_flight.append(len(s.conn.pending)))
            s.retrieve((RetrRequest(n) for n, _ in uids), sink)
            sent_before_first_reply = in_flight[0]
            bodies = sink.got()
            s.quit()
    assert sent_before_first_reply == 50  # the window was full: really pipelined
    assert len(bodies) == 1000
    for n, msg in zip(range(1, 1001), store.messages(), strict=True):
        assert bytes(bodies[n]) == stored_form(msg.data)


def test_retr_and_queued_dele_share_the_pipeline(plain: POP3TestServer, store: MailStore) -> None:
    with Session.open(opts(plain)) as s:
        s.login("pass")
        sink = Collect(after_end={1: [1]})  # DELE 1 allowed once RETR 1 has ended
        s.retrieve([RetrRequest(1), RetrRequest(2)], sink)
        assert sink.dele_replies == {1: None}
        # RETR 1 ends only when the next reply (RETR 2's +OK) shows it whole,
        # and the DELE then rides the same pipeline.
        assert sink.events == [
            ("started", 1),
            ("ended", 1),
            ("started", 2),
            ("ended", 2),
            ("deleted", 1),
        ]
        s.quit()
    assert len(store) == len(sample_messages()) - 1


def test_without_pipelining_every_body_is_confirmed(store: MailStore) -> None:
    # One command at a time: the last body has ended before the requests run
    # out, and a NOOP must still follow it, or it never counts (nor gets stored).
    with POP3TestServer(store, pipelining=False) as srv, Session.open(opts(srv)) as s:
        s.login("pass")
        assert not s.conn.pipelining
        sink = Collect()
        s.retrieve((RetrRequest(n) for n, _ in s.uidl()), sink)
        s.quit()
    assert sorted(sink.octets) == list(range(1, len(sample_messages()) + 1))
    assert srv.sessions[0].command_names()[-2:] == ["NOOP", "QUIT"]


def test_drop_mid_retr_raises(store: MailStore) -> None:
    with POP3TestServer(store, faults=Faults(drop_during_retr=(2, 100))) as srv:
        s = Session.open(opts(srv))
        s.login("pass")
        with pytest.raises((RemoteProtocolError, TransportError)):
            fetch_all(s, [1, 2, 3])
        s.abort()
    assert len(store) == len(sample_messages())


def test_endless_body_cut_off_by_limit(store: MailStore) -> None:
    with POP3TestServer(store, faults=Faults(endless_body=1)) as srv:
        s = Session.open(opts(srv))
        s.login("pass")
        sink = Collect()
        with pytest.raises(RemoteProtocolError, match="limit"):
            s.retrieve([RetrRequest(1, limit=1_000_000)], sink)
        s.abort()
    assert 0 < len(sink.bodies[1]) <= 1_000_000
    assert sink.octets == {}  # never "ended": nothing of it may be kept


def test_stall_times_out(store: MailStore) -> None:
    with POP3TestServer(store, faults=Faults(stall={"UIDL": 3.0})) as srv:
        s = Session.open(opts(srv, timeout=0.5))
        s.login("pass")
        with pytest.raises(TimeoutError_):
            s.uidl()
        s.abort()


@pytest.mark.parametrize("place", ["greeting", "uidl", "capa"])
def test_overlong_lines_are_protocol_errors(store: MailStore, place: str) -> None:
    faults = Faults(overlong_line=place)  # type: ignore[arg-type]
    with POP3TestServer(store, faults=faults) as srv, pytest.raises(RemoteProtocolError):
        s = Session.open(opts(srv))
        s.login("pass")
        s.uidl()


def test_unstuffed_dot_line_detected(store: MailStore) -> None:
    # CPython gh-95252: the body ends early and the stream is out of step; the next
    # reply is not a status line, so the session stops instead of guessing.
    with POP3TestServer(store, faults=Faults(unstuffed_dot_line=1)) as srv:
        s = Session.open(opts(srv))
        s.login("pass")
        with pytest.raises(RemoteProtocolError):
            fetch_all(s, [1, 2])
        s.abort()


def test_quit_error_reported(store: MailStore) -> None:
    with POP3TestServer(store, faults=Faults(quit_error=True)) as srv:
        s = Session.open(opts(srv))
        s.login("pass")
        delete(s, [1, 2])
        with pytest.raises(ServerError, match="QUIT"):
            s.quit()


def test_connection_refused_is_transport_error() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TransportError):
        Session.open(
            SessionOptions(host="127.0.0.1", port=port, username="u", tls=TlsMode.NONE, timeout=2)
        )
