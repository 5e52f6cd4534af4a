"""The pipelining window: chosen from the measured round trip unless configured.

A slow link is a real one: a small proxy on 127.0.0.1 holds every chunk for a
fixed time in each direction before passing it on, between the session and
the project's test server.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pytest

from popsync.session import BASE_WINDOW, MAX_WINDOW, RetrRequest, Session, auto_window
from popsync.testing.mailstore import MailStore
from popsync.testing.samples import generate_messages
from popsync.testing.server import POP3TestServer
from tests.helpers import Collect
from tests.test_session import opts

pytestmark = pytest.mark.timeout(60)

#: Seconds each chunk is held per direction: a 30 ms round trip.
DELAY = 0.015


def _forward(src: socket.socket, dst: socket.socket, delay: float) -> None:
    """Copy *src* to *dst*, each chunk *delay* seconds after it was read.

    A reader stamps chunks with their due time and a writer passes them on
    then, so the delay does not add up over a stream.
    """
    chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()
    held = threading.Event()  # never set: its wait() is a timed hold

    def write() -> None:
        with suppress(OSError):  # the other side is gone: so is this stream
            while True:
                due, data = chunks.get()
                held.wait(max(0.0, due - time.monotonic()))
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        while data := src.recv(65536):
            chunks.put((time.monotonic() + delay, data))
    except OSError:
        pass
    chunks.put((time.monotonic() + delay, b""))
    writer.join(10)


@contextmanager
def delaying_proxy(port: int, delay: float = DELAY) -> Iterator[int]:
    """A one-connection proxy to 127.0.0.1:*port*; yields its own port."""
    listener = socket.create_server(("127.0.0.1", 0))
    threads: list[threading.Thread] = []
    conns: list[socket.socket] = []

    def serve() -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        server = socket.create_connection(("127.0.0.1", port))
        conns.extend((client, server))
        back = threading.Thread(target=_forward, args=(server, client, delay), daemon=True)
        back.start()
        threads.append(back)
        _forward(client, server, delay)

    acceptor = threading.Thread(target=serve, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1]
    finally:
        with suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes an accept still waiting
        listener.close()
        acceptor.join(10)
        for thread in threads:
            thread.join(10)
        for conn in conns:
            conn.close()


def retrieve_all(port: int, srv: POP3TestServer, **kw: object) -> tuple[float | None, int, int]:
    """Log in through *port*, fetch every message; the round trip measured
    then, the window, and how many commands were in flight when the first
    body began."""
    client = opts(srv, port=port, **kw)
    with Session.open(client) as s:
        s.login("pass")
        uids = s.uidl()
        s.scan()  # as a poll does: one more sample of the round trip
        in_flight: list[int] = []
        sink = Collect(on_started=lambda _: in_flight.append(len(s.conn.pending)))
        s.retrieve((RetrRequest(n) for n, _ in uids), sink)
        assert len(sink.got()) == len(uids)
        measured = s.round_trip
        s.quit()
    return measured, s.window(), in_flight[0]


@pytest.fixture
def store() -> MailStore:
    return MailStore(generate_messages(400, 400, seed=3))


def test_a_slow_link_gets_a_larger_window(
    store: MailStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="popsync.steps")
    with POP3TestServer(store) as srv, delaying_proxy(srv.port) as port:
        round_trip, window, in_flight = retrieve_all(port, srv)
    assert round_trip is not None and round_trip >= 2 * DELAY
    assert window == auto_window(round_trip) > BASE_WINDOW
    assert in_flight == window  # the whole window was sent before the first reply
    lines = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "window"]
    assert len(lines) == 1
    assert f"pipeline window {window} (from the round trip; round trip " in lines[0]


def test_a_fast_link_keeps_the_base_window(store: MailStore) -> None:
    with POP3TestServer(store) as srv:
        round_trip, window, in_flight = retrieve_all(srv.port, srv)
    assert round_trip is not None
    assert window == in_flight == BASE_WINDOW, f"round trip {round_trip * 1000:.1f} ms"


def test_a_configured_window_is_honoured_on_a_slow_link(store: MailStore) -> None:
    with POP3TestServer(store) as srv, delaying_proxy(srv.port) as port:
        _, window, in_flight = retrieve_all(port, srv, pipeline_window=20)
    assert window == in_flight == 20


def test_without_pipelining_one_command_at_a_time() -> None:
    store = MailStore(generate_messages(5, 400, seed=3))  # each one costs a round trip
    with POP3TestServer(store, pipelining=False) as srv, delaying_proxy(srv.port) as port:
        _, window, in_flight = retrieve_all(port, srv)
    assert window == in_flight == 1


@pytest.mark.parametrize(
    ("round_trip", "window"),
    [(None, BASE_WINDOW), (0.0, BASE_WINDOW), (0.001, BASE_WINDOW), (0.02, 128), (1.0, MAX_WINDOW)],
)
def test_auto_window_is_bounded(round_trip: float | None, window: int) -> None:
    assert auto_window(round_trip) == window
