"""The session's exact bytes on the wire, against a scripted server.

Each test scripts what the server says (:class:`tests.fakes.FakeTransport`),
runs the real :class:`popsync.session.Session` over it, and states every byte
popsync sent, write by write: the login commands, UTF8 before them when CAPA
lists it (RFC 6856 §2), a pipelined RETR stream closed by NOOP with its
DELEs riding along, and silence after a protocol error.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from popsync.errors import LocalProtocolError, RemoteProtocolError
from popsync.options import AuthMethod, TlsMode
from popsync.session import RetrRequest, Session, SessionOptions
from tests.fakes import FakeTransport
from tests.helpers import Collect

GREETING = b"+OK POP3 ready <1.2@pop.test>\r\n"


def options(**kw: object) -> SessionOptions:
    base: dict[str, object] = {
        "host": "pop.test",
        "port": 110,
        "username": "user",
        "tls": TlsMode.NONE,
        "allow_plaintext": True,
    }
    return SessionOptions(**{**base, **kw})  # type: ignore[arg-type]


def capa(*lines: bytes) -> bytes:
    return b"+OK capabilities follow\r\n" + b"".join(line + b"\r\n" for line in lines) + b".\r\n"


def bytewise(data: bytes) -> Iterator[bytes]:
    """The script one octet per read: the session must not care how replies are cut."""
    return (data[i : i + 1] for i in range(len(data)))


@pytest.mark.parametrize("cut", ["whole", "bytewise"])
def test_user_pass_login(cut: str) -> None:
    script = GREETING + capa(b"USER", b"UIDL") + b"+OK\r\n+OK logged in\r\n"
    t = FakeTransport([script] if cut == "whole" else bytewise(script))
    session = Session.start(t, options(auth=AuthMethod.AUTO))
    session.login("pa ss")  # RFC 1939 §7: the rest of the line is the password
    assert t.writes == [b"CAPA\r\n", b"USER user\r\n", b"PASS pa ss\r\n"]
    assert not t.script  # every byte of the script was read, none beyond
    assert session.greeting == b"POP3 ready <1.2@pop.test>"


def test_auth_plain_when_capa_offers_it() -> None:
    t = FakeTransport([GREETING, capa(b"SASL PLAIN LOGIN", b"USER"), b"+OK welcome\r\n"])
    session = Session.start(t, options(username="user@example.org"))
    session.login("s3cret")
    # RFC 4616: authzid NUL authcid NUL password, base64, as the initial response.
    assert t.writes == [b"CAPA\r\n", b"AUTH PLAIN AHVzZXJAZXhhbXBsZS5vcmcAczNjcmV0\r\n"]


def test_utf8_goes_before_the_login_when_capa_lists_it() -> None:
    t = FakeTransport(
        [GREETING, capa(b"UTF8", b"USER"), b"+OK UTF8 enabled\r\n", b"+OK\r\n", b"+OK in\r\n"]
    )
    Session.start(t, options(auth=AuthMethod.USER)).login("pw")
    assert t.writes == [b"CAPA\r\n", b"UTF8\r\n", b"USER user\r\n", b"PASS pw\r\n"]


def test_utf8_refused_changes_nothing() -> None:
    t = FakeTransport([GREETING, capa(b"UTF8"), b"-ERR not today\r\n", b"+OK\r\n", b"+OK in\r\n"])
    Session.start(t, options(auth=AuthMethod.USER)).login("pw")
    assert t.writes == [b"CAPA\r\n", b"UTF8\r\n", b"USER user\r\n", b"PASS pw\r\n"]


def logged_in(*replies: bytes, pipelining: bool = True) -> tuple[Session, FakeTransport]:
    """A session past USER/PASS; *replies* are what the server says after that."""
    tags = [b"USER", b"PIPELINING"] if pipelining else [b"USER"]
    t = FakeTransport([GREETING, capa(*tags), b"+OK\r\n", b"+OK in\r\n", *replies])
    session = Session.start(t, options(auth=AuthMethod.USER))
    session.login("pw")
    del t.writes[:]
    return session, t


def test_pipelined_retr_stream_closes_with_noop_and_deletes_ride_along() -> None:
    session, t = logged_in(
        b"+OK 12 octets\r\nSubject: a\r\n\r\n..x\r\n.\r\n"
        b"+OK 9 octets\r\nSubject: b\r\n.\r\n"
        b"+OK\r\n"  # NOOP: only now is the last body known to be whole
        b"+OK 1 deleted\r\n+OK 2 deleted\r\n"
    )
    sink = Collect(after_end={1: [1], 2: [2]})
    session.retrieve([RetrRequest(1), RetrRequest(2)], sink)
    assert t.writes == [
        b"RETR 1\r\nRETR 2\r\nNOOP\r\n",  # one write: the window is open
        b"DELE 1\r\n",  # once RETR 2's +OK showed body 1 ended well
        b"DELE 2\r\n",  # once NOOP's +OK showed the same for body 2
    ]
    assert sink.got() == {1: b"Subject: a\n\n.x\n", 2: b"Subject: b\n"}
    assert sink.octets == {1: 18, 2: 12}  # RFC 1939 §11: CRLF as two, the stuffing dot not at all
    assert sink.events == [
        ("started", 1),
        ("ended", 1),
        ("started", 2),
        ("ended", 2),
        ("deleted", 1),
        ("deleted", 2),
    ]
    assert sink.dele_replies == {1: None, 2: None}


def test_without_pipelining_the_last_body_is_still_closed_by_noop() -> None:
    # One command at a time: the last body has ended before the requests run
    # out, and still needs a reply after it before it counts.
    session, t = logged_in(b"+OK\r\nSubject: a\r\n.\r\n", b"+OK\r\n", b"+OK\r\n", pipelining=False)
    sink = Collect(after_end={1: [1], 2: [2]})
    session.retrieve([RetrRequest(1)], sink)
    assert t.writes == [b"RETR 1\r\n", b"NOOP\r\n", b"DELE 1\r\n"]
    assert sink.events == [("started", 1), ("ended", 1), ("deleted", 1)]


def test_nothing_is_sent_after_a_protocol_error() -> None:
    # Body 1 ends, then where RETR 2's status line is due comes the rest of a
    # message: the stream is out of step, and body 1 may have been cut short.
    session, t = logged_in(b"+OK\r\nSubject: a\r\n.\r\nthe rest of message 1\r\n", b"")
    sink = Collect(after_end={1: [1], 2: [2]})
    with pytest.raises(RemoteProtocolError, match="RETR"), session:
        session.retrieve([RetrRequest(1), RetrRequest(2)], sink)
    assert t.writes == [b"RETR 1\r\nRETR 2\r\nNOOP\r\n"]  # no DELE, no QUIT
    assert sink.events == [("started", 1)]  # body 1 never counted as whole
    assert t.closed
    with pytest.raises(LocalProtocolError):
        session.quit()
    assert t.writes == [b"RETR 1\r\nRETR 2\r\nNOOP\r\n"]


def test_pipelined_retrs_leave_in_batches_of_half_a_window() -> None:
    # Refilling the window after every reply would send one RETR per segment
    # (one wake-up of the server per message); half a window at a time does not.
    bodies = b"".join(b"+OK\r\nSubject: %d\r\n.\r\n" % n for n in range(1, 9))
    session, t = logged_in(bodies + b"+OK\r\n")
    session.options = options(auth=AuthMethod.USER, pipeline_window=4)
    sink = Collect()
    session.retrieve([RetrRequest(n) for n in range(1, 9)], sink)
    assert t.writes == [
        b"RETR 1\r\nRETR 2\r\nRETR 3\r\nRETR 4\r\n",
        b"RETR 5\r\nRETR 6\r\n",  # once two of the four are answered
        b"RETR 7\r\nRETR 8\r\n",
        b"NOOP\r\n",
    ]
    assert sorted(sink.got()) == list(range(1, 9))
