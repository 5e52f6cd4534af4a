"""A recording stand-in for the network, for byte-exact session tests.

:class:`FakeTransport` replaces :class:`popsync.transport.Transport` under
:class:`popsync.session.Session`: what the server says is a script of chunks,
handed out one per ``recv()`` exactly as cut, and every ``send()`` is kept as
one entry, so a test states the exact bytes and the exact writes.  Real
sockets and the project's test server remain the rule elsewhere; this is for
the cases where the bytes themselves are the behaviour.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Iterable

from popsync.errors import TransportError
from popsync.transport import TlsInfo, Transport


class FakeTransport(Transport):
    """A scripted server and a recording client side; no socket, no clock.

    ``recv()`` returns the next chunk of *script* (``b""`` in the script is
    the server closing).  A read past the script's end is a test bug, or the
    session reading what it should not wait for: AssertionError.  After
    :meth:`close` or :meth:`interrupt`, every call raises the error given (as
    the real transport does), and ``send()`` records nothing.
    """

    def __init__(self, script: Iterable[bytes], *, where: str = "pop.test:110") -> None:
        # The real constructor wants a socket: none here, on purpose.
        self.host, port = where.rsplit(":", 1)
        self.port = int(port)
        self.where = where
        self.timeout = 5.0
        self.deadline = None
        self.script: deque[bytes] = deque(script)
        #: Each ``send()``'s bytes, in order.
        self.writes: list[bytes] = []
        #: Where in ``writes`` the TLS handshake happened (``start_tls()``).
        self.tls_at: int | None = None
        self.closed = False
        self._ended: TransportError | None = None
        self._quick_ack = False

    def _ack_now(self) -> None:
        """No socket, so no ACK to hurry (see Transport.quick_ack)."""

    @property
    def sent(self) -> bytes:
        """Everything sent, as one byte string."""
        return b"".join(self.writes)

    @property
    def is_tls(self) -> bool:
        return self.tls_at is not None

    @property
    def peer(self) -> str:
        return self.where

    def tls_info(self) -> TlsInfo | None:
        if self.tls_at is None:
            return None
        return TlsInfo(version="TLSv1.3", cipher="FAKE", certificate_der=None, certificate={})

    def ended(self) -> TransportError | None:
        return self._ended

    def _check(self) -> None:
        if self._ended is not None:
            raise self._ended

    def start_tls(self, ssl_context: ssl.SSLContext) -> None:
        self._check()
        self.tls_at = len(self.writes)

    def send(self, data: bytes) -> None:
        self._check()
        self.writes.append(bytes(data))

    def readable_within(self, seconds: float) -> bool:
        return True  # the script is the server's reply, already here

    def recv(self, until: float | None = None) -> bytes:
        self._check()
        if not self.script:
            raise AssertionError(f"read past the end of the script; sent so far: {self.writes}")
        return self.script.popleft()

    def interrupt(self, error: TransportError) -> None:
        if self._ended is None:
            self._ended = error

    def close(self, error: TransportError | None = None) -> None:
        self.closed = True
        if self._ended is None:
            self._ended = error or TransportError(f"{self.where}: closed")
