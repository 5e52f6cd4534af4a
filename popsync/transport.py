"""The thin I/O layer: a TCP connection, optionally TLS, with a deadline per call.

Contract:

* Every blocking call (connect, TLS handshake, each send, each receive)
  finishes within ``timeout`` seconds or raises :class:`TimeoutError_`.  The
  timeout is set on the socket itself -- never ``socket.setdefaulttimeout``,
  never ``signal.alarm`` (useless outside the main thread).
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

    def __init__(self, sock: socket.socket, host: str, port: int, timeout: float) -> None:
        self._sock: socket.socket = sock
        self.host = host
        self.port = port
        self.timeout = timeout
        self._where = f"{host}:{port}"
        sock.settimeout(timeout)

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> Transport:
        """Open a TCP connection; with *ssl_context*, TLS from the first byte (RFC 8314 §3.1).

        Raises TransportError, TimeoutError_ or SecurityError.
        """
        where = f"{host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except (OSError, ssl.SSLError) as exc:
            raise _translate(exc, "connecting", where) from None
        transport = cls(sock, host, port, timeout)
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

    @property
    def tls_version(self) -> str | None:
        return self._sock.version() if isinstance(self._sock, ssl.SSLSocket) else None

    def start_tls(self, ssl_context: ssl.SSLContext) -> None:
        """Run the TLS handshake on this connection, checking the configured host name."""
        try:
            self._sock = ssl_context.wrap_socket(self._sock, server_hostname=self.host)
        except (OSError, ssl.SSLError) as exc:
            raise _translate(exc, "negotiating TLS", self._where) from None
        self._sock.settimeout(self.timeout)

    def send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            raise _translate(exc, "sending", self._where) from None

    def recv(self) -> bytes:
        """Up to RECV_SIZE bytes; ``b""`` when the server closed the connection.

        Over TLS one read returns at most one record (16 KiB), so after the
        first (blocking, with the deadline) read, the records that are already
        here are drained without waiting: bodies reach the parser in large
        chunks, and the per-chunk Python work is paid a tenth as often.
        """
        sock = self._sock
        try:
            data = sock.recv(RECV_SIZE)
            if not data or not isinstance(sock, ssl.SSLSocket):
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
                sock.settimeout(self.timeout)
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except (OSError, ssl.SSLError) as exc:
            raise _translate(exc, "receiving", self._where) from None

    def close(self) -> None:
        """Close without ceremony; never raises."""
        with contextlib.suppress(OSError):
            self._sock.close()
