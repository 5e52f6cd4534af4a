"""The thin I/O layer: a TCP connection, optionally TLS, with a deadline per call.

Contract:

* Every blocking call (connect, TLS handshake, each send, each receive)
  finishes within ``timeout`` seconds or raises :class:`TimeoutError_`.  The
  timeout is set on the socket itself -- never ``socket.setdefaulttimeout``,
  never ``signal.alarm`` (useless outside the main thread).
* Two more limits shorten that wait, never lengthen it: the connection's
  :class:`Deadline` (the whole conversation must be over by then; every call
  after it raises its error), and a receive's own ``until`` (the moment the
  caller's progress rule gives up, see :mod:`popsync.pace`).  Both are
  moments on the monotonic clock.
* :meth:`Transport.interrupt` is the one method safe from another thread: it
  shuts the socket down, which wakes a receive or send blocked in the
  thread that owns the transport (TLS included), and that call -- and every
  later one -- raises the error given to it.
* TLS is always verified: :func:`make_ssl_context` starts from
  ``ssl.create_default_context()`` (CERT_REQUIRED, host name checked) and
  requires TLS 1.2 or newer (RFC 8997).  The name checked is the host the
  user configured (RFC 7817), never one learnt from DNS.
* No ``OSError`` or ``ssl.SSLError`` leaves this module: they become
  :class:`TransportError` (network), :class:`TimeoutError_` (deadline) or
  :class:`SecurityError` (the certificate is not trusted for this host).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from popsync.errors import ConfigError, SecurityError, TimeoutError_, TransportError

#: Bytes asked of the kernel per receive: large, so bodies arrive in big chunks.
RECV_SIZE = 256 * 1024


def make_ssl_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """A verifying client context; *ca_file* adds a trust anchor to the system's.

    Raises ConfigError if *ca_file* cannot be read as PEM certificates.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8997
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"ca_file {ca_file}: cannot load certificates: {exc}") from None
    return ctx


@dataclass(frozen=True, slots=True)
class Deadline:
    """A moment on the monotonic clock, and what to say when it has passed."""

    at: float
    text: str

    @classmethod
    def after(cls, seconds: float, text: str) -> Deadline:
        """The deadline *seconds* from now."""
        return cls(time.monotonic() + seconds, text)

    def error(self) -> TimeoutError_:
        return TimeoutError_(self.text)


def _translate(exc: BaseException, doing: str, where: str) -> Exception:
    """Map an OS / TLS exception to the popsync error that says who is to blame."""
    if isinstance(exc, socket.timeout | TimeoutError):
        return TimeoutError_(f"{where}: timed out while {doing}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or str(exc)
        return SecurityError(
            f"{where}: TLS certificate not trusted ({reason}); refusing to continue"
        )
    if isinstance(exc, ssl.SSLError):
        return TransportError(f"{where}: TLS error while {doing}: {exc.reason or exc}")
    if isinstance(exc, socket.gaierror):
        return TransportError(f"{where}: cannot resolve host name: {exc.strerror}")
    if isinstance(exc, OSError):
        text = exc.strerror or str(exc) or type(exc).__name__
        return TransportError(f"{where}: network error while {doing}: {text}")
    return TransportError(f"{where}: {doing} failed: {exc}")


class Transport:
    """A connected stream to one POP3 server."""

    def __init__(
        self,
        sock: socket.socket,
        host: str,
        port: int,
        timeout: float,
        *,
        deadline: Deadline | None = None,
    ) -> None:
        self._sock: socket.socket = sock
        self.host = host
        self.port = port
        self.timeout = timeout
        self.deadline = deadline
        self.where = f"{host}:{port}"
        # Guards _sock (start_tls replaces it) against interrupt() and close().
        self._lock = threading.Lock()
        self._interrupted: TransportError | None = None
        self._sock_timeout = timeout
        sock.settimeout(timeout)

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        deadline: Deadline | None = None,
    ) -> Transport:
        """Open a TCP connection; with *ssl_context*, TLS from the first byte (RFC 8314 §3.1).

        Raises TransportError, TimeoutError_ (also when *deadline* passes) or
        SecurityError.
        """
        where = f"{host}:{port}"
        wait = timeout
        if deadline is not None:
            wait = min(wait, deadline.at - time.monotonic())
            if wait <= 0:
                raise deadline.error()
        try:
            sock = socket.create_connection((host, port), timeout=wait)
        except (OSError, ssl.SSLError) as exc:
            if deadline is not None and time.monotonic() >= deadline.at:
                raise deadline.error() from None
            raise _translate(exc, "connecting", where) from None
        transport = cls(sock, host, port, timeout, deadline=deadline)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                transport.start_tls(ssl_context)
        except BaseException:
            transport.close()
            raise
        return transport

    @property
    def is_tls(self) -> bool:
        return isinstance(self._sock, ssl.SSLSocket)

    # -- limits -----------------------------------------------------------------

    def ended(self) -> TransportError | None:
        """The error every call now raises (interrupted, or past the deadline), or None."""
        if self._interrupted is not None:
            return self._interrupted
        if self.deadline is not None and time.monotonic() >= self.deadline.at:
            return self.deadline.error()
        return None

    def _arm(self, until: float | None) -> None:
        """Set the socket timeout for the next call: ``timeout``, cut short by the
        deadline and *until*.  Raises if either has passed already."""
        wait = self.timeout
        if self.deadline is not None or until is not None:
            ended = self.ended()
            if ended is not None:
                raise ended
            now = time.monotonic()
            if self.deadline is not None:
                wait = min(wait, self.deadline.at - now)
            if until is not None:
                if until <= now:
                    raise TimeoutError_(f"{self.where}: timed out while receiving")
                wait = min(wait, until - now)
        elif self._interrupted is not None:
            raise self._interrupted
        if wait != self._sock_timeout:  # one fcntl saved per call in the common case
            self._sock.settimeout(wait)
            self._sock_timeout = wait

    def _failure(self, exc: BaseException, doing: str) -> Exception:
        """The error to raise for *exc*: an interruption or a passed deadline
        explains it better than the OS error it caused."""
        return self.ended() or _translate(exc, doing, self.where)

    # -- I/O ----------------------------------------------------------------------

    def start_tls(self, ssl_context: ssl.SSLContext) -> None:
        """Run the TLS handshake on this connection, checking the configured host name."""
        self._arm(None)
        try:
            with self._lock:
                if self._interrupted is not None:
                    raise self._interrupted
                tls = ssl_context.wrap_socket(
                    self._sock, server_hostname=self.host, do_handshake_on_connect=False
                )
                self._sock = tls
            tls.do_handshake()  # outside the lock, so interrupt() can wake it
        except (OSError, ssl.SSLError) as exc:
            raise self._failure(exc, "negotiating TLS") from None

    def send(self, data: bytes) -> None:
        self._arm(None)
        try:
            self._sock.sendall(data)  # the timeout bounds the whole sendall
        except (OSError, ssl.SSLError) as exc:
            raise self._failure(exc, "sending") from None

    def recv(self, until: float | None = None) -> bytes:
        """Up to RECV_SIZE bytes; ``b""`` when the server closed the connection.

        Waits at most ``timeout`` seconds, and not past *until* (monotonic) nor
        the deadline.  Over TLS one read returns at most one record (16 KiB),
        so after the first (blocking) read, the records that are already here
        are drained without waiting: bodies reach the parser in large chunks,
        and the per-chunk Python work is paid a tenth as often.
        """
        self._arm(until)
        sock = self._sock
        try:
            data = sock.recv(RECV_SIZE)
            if not data or not isinstance(sock, ssl.SSLSocket):
                if self._interrupted is not None:  # the "end of stream" was our shutdown
                    raise self._interrupted
                return data
            chunks = [data]
            total = len(data)
            sock.settimeout(0.0)
            try:
                while total < RECV_SIZE:
                    try:
                        more = sock.recv(RECV_SIZE - total)
                    except (ssl.SSLWantReadError, BlockingIOError):
                        break
                    if not more:  # end of stream: the next recv() reports it
                        break
                    chunks.append(more)
                    total += len(more)
            finally:
                sock.settimeout(self._sock_timeout)
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except (OSError, ssl.SSLError) as exc:
            raise self._failure(exc, "receiving") from None

    def interrupt(self, error: TransportError) -> None:
        """Make every blocking call, now and later, raise *error*.  Thread-safe.

        Shuts the socket down in both directions: a receive or send blocked in
        another thread wakes at once.  Only the descriptor is touched (the
        plain-socket shutdown, also under TLS), never the TLS state another
        thread may be using; closing is left to the owner (:meth:`close`).
        """
        with self._lock:
            if self._interrupted is None:
                self._interrupted = error
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def close(self, error: TransportError | None = None) -> None:
        """Close without ceremony; never raises.  Owner thread only.

        With *error*, every later call raises it (as after :meth:`interrupt`).
        """
        with self._lock:
            if self._interrupted is None:
                self._interrupted = error
            with contextlib.suppress(OSError):
                self._sock.close()
