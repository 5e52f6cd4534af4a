"""Socket options for servers that answer one command at a time.

A server without PIPELINING that writes a RETR reply's status line and body
in two sends, with Nagle's algorithm on, holds the body until the client
ACKs the status line.  popsync asks Linux to ACK at once (TCP_QUICKACK,
re-armed after every read) on such sessions, and never delays its own
commands (TCP_NODELAY).  These tests read the options back from the socket.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from popsync.session import Session, SessionOptions
from popsync.testing.mailstore import MailStore, to_crlf
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.test_session import fetch_all, opts

pytestmark = pytest.mark.timeout(60)

QUICKACK = getattr(socket, "TCP_QUICKACK", None)
needs_quickack = pytest.mark.skipif(QUICKACK is None, reason="TCP_QUICKACK is Linux-only")


def tcp_option(session: Session, option: int) -> int:
    """The option as the kernel has it on the session's socket, read back by getsockopt."""
    sock: socket.socket = session.transport._sock  # the real socket is the point
    return socket.socket.getsockopt(sock, socket.IPPROTO_TCP, option)


@pytest.fixture
def store() -> MailStore:
    return MailStore(generate_messages(20, 4096, 11))


@pytest.fixture
def lockstep(store: MailStore) -> Iterator[POP3TestServer]:
    """Like popa3d: no PIPELINING, status line and body written in separate sends."""
    with POP3TestServer(store, pipelining=False, write_each=True) as srv:
        yield srv


def login(server: POP3TestServer) -> Session:
    options: SessionOptions = opts(server)
    session = Session.open(options)
    session.login("pass")
    return session


@needs_quickack
def test_quickack_rearmed_after_every_read_without_pipelining(
    lockstep: POP3TestServer, store: MailStore
) -> None:
    assert QUICKACK is not None
    with login(lockstep) as s:
        assert s.transport.quick_ack
        # Nothing was sent after the last reply was read: still armed.
        assert tcp_option(s, QUICKACK) == 1
        got = fetch_all(s, [n for n, _ in s.uidl()])
        assert tcp_option(s, QUICKACK) == 1
        assert tcp_option(s, socket.TCP_NODELAY) != 0
    # The server's write-each mode changes timing only, never the bytes.
    assert list(got.values()) == [to_crlf(m.data).replace(b"\r\n", b"\n") for m in store.messages()]


def test_pipelining_sessions_leave_acks_to_the_kernel(store: MailStore) -> None:
    with POP3TestServer(store) as srv, login(srv) as s:
        assert not s.transport.quick_ack
        assert tcp_option(s, socket.TCP_NODELAY) != 0
