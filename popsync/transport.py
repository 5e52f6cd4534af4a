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
  requires TLS 1.2 or newer (RFC 8997; ``tls_min_version: "1.3"`` raises
  that).  The name checked is the host the user configured (RFC 7817),
  never one learnt from DNS.  With pins (``tls_fingerprint``) the context is
  a :class:`PinnedContext`: the pin replaces CA and name checks, and the
  peer certificate is compared right after the handshake, before a byte of
  POP3 is read or written; a mismatch is a SecurityError naming both
  fingerprints (see :mod:`popsync.tlspin`).
* No ``OSError`` or ``ssl.SSLError`` leaves this module: they become
  :class:`TransportError` (network), :class:`TimeoutError_` (deadline) or
  :class:`SecurityError` (the certificate is not trusted for this host).
* A TLS mode that does not match the port gets a hint, not OpenSSL jargon:
  when the handshake of implicit TLS fails, or a plain connection's greeting
  is late, a second short-lived connection probes what the port speaks (see
  :func:`greets_in_clear`, :func:`answers_tls`), and a positive answer raises
  :class:`TlsModeMismatch` (permanent).  A probe never sends a credential,
  and only a positive answer changes the error: anything else (silence, a
  reset, a captive portal's HTTP) keeps the ordinary, temporary one.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from popsync import tlspin
from popsync.errors import (
    ConfigError,
    SecurityError,
    TimeoutError_,
    TlsModeMismatch,
    TransportError,
)

#: Bytes asked of the kernel per receive: large, so bodies arrive in big chunks.
RECV_SIZE = 256 * 1024

#: The longest a TLS-mode probe waits (seconds), and how long a plain
#: connection's greeting may be silent before one is sent (never above the
#: account's ``timeout``).  Real POP3 servers greet at once; those that delay
#: (tarpits, slow reverse DNS) lose nothing: the probe only adds an answer.
PROBE_WAIT = 5.0

#: Linux's TCP_QUICKACK (``socket`` names it only on Linux builds): ACK what
#: arrives at once instead of delaying the ACK by up to 40 ms.  Not sticky: the
#: kernel may fall back to delayed ACKs, so it is set again after every read.
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)

#: Certificate verification results (X509_V_ERR_*) that mean "issued by a CA
#: the system does not know": self-signed leaf or chain, unknown issuer.
_UNKNOWN_CA = frozenset({18, 19, 20, 21})


#: SSL error reasons that mean "no TLS version both sides accept".
_VERSION_REASONS = frozenset(
    {
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "UNSUPPORTED_PROTOCOL",
        "NO_PROTOCOLS_AVAILABLE",
        "VERSION_TOO_LOW",
        "VERSION_TOO_HIGH",
    }
)
#: SSL error reasons that mean "the server wants (another) client certificate".
_CLIENT_CERT_REASONS = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    }
)
#: ``tls_min_version`` values and the TLS version each is.
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class PinnedContext(ssl.SSLContext):
    """A client context that trusts a server by its pins alone (no CA, no
    host-name check); :class:`Transport` compares them after each handshake."""

    pins: tuple[str, ...] = ()


def make_ssl_context(
    ca_file: Path | None = None,
    *,
    pins: tuple[str, ...] = (),
    client_cert: Path | None = None,
    client_key: Path | None = None,
    min_version: str = "1.2",
) -> ssl.SSLContext:
    """A verifying client context; *ca_file* adds a trust anchor to the system's.

    With *pins* (canonical, :func:`popsync.tlspin.parse_pin`) a
    :class:`PinnedContext` instead, which neither checks a CA nor the host
    name.  *client_cert* (and *client_key*, unless the cert file holds the
    key) is offered to servers that ask; *min_version* is ``"1.2"`` or
    ``"1.3"``.  Raises ConfigError if a file cannot be loaded.
    """
    if pins:
        pinned = PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
        pinned.check_hostname = False
        pinned.verify_mode = ssl.CERT_NONE  # the pin is checked after the handshake
        pinned.pins = pins
        ctx: ssl.SSLContext = pinned
    else:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"ca_file {ca_file}: cannot load certificates: {exc}") from None
    ctx.minimum_version = TLS_VERSIONS[min_version]  # RFC 8997: never below 1.2
    if client_cert is not None:
        _load_client_cert(ctx, client_cert, client_key)
    return ctx


def _load_client_cert(ctx: ssl.SSLContext, cert: Path, key: Path | None) -> None:
    """Load the client certificate; an encrypted key is refused, never prompted for."""

    def no_passphrase() -> bytes:
        raise ConfigError(
            f"tls_client_key {key or cert}: the key is encrypted; "
            "popsync needs it unencrypted (chmod 600 keeps it private)"
        )

    try:
        ctx.load_cert_chain(str(cert), None if key is None else str(key), no_passphrase)
    except (OSError, ssl.SSLError) as exc:
        files = str(cert) if key is None else f"{cert}, {key}"
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise ConfigError(
            f"tls_client_cert {files}: cannot load the certificate and its key: {reason}"
        ) from None


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
        return _untrusted(exc, where)
    if isinstance(exc, ssl.SSLError):
        return _tls_failure(exc, doing, where)
    if isinstance(exc, socket.gaierror):
        return TransportError(f"{where}: cannot resolve host name: {exc.strerror}")
    if isinstance(exc, OSError):
        text = exc.strerror or str(exc) or type(exc).__name__
        return TransportError(f"{where}: network error while {doing}: {text}")
    return TransportError(f"{where}: {doing} failed: {exc}")


def _tls_failure(exc: ssl.SSLError, doing: str, where: str) -> Exception:
    """A TLS error: a version or client-certificate refusal is permanent (the
    config must change), anything else a temporary TransportError."""
    if exc.reason in _VERSION_REASONS:
        return SecurityError(
            f"{where}: no TLS version both sides accept ({exc.reason}): the server offers "
            "none at or above popsync's minimum (tls_min_version, default 1.2)"
        )
    if exc.reason in _CLIENT_CERT_REASONS:
        return SecurityError(
            f"{where}: the server refused the TLS client certificate, or wants one "
            f"({exc.reason}): check tls_client_cert and tls_client_key"
        )
    return TransportError(f"{where}: TLS error while {doing}: {exc.reason or exc}")


def _untrusted(exc: ssl.SSLCertVerificationError, where: str) -> SecurityError:
    """The refusal of a certificate; an unknown CA gets the ``ca_file`` hint."""
    reason = exc.verify_message or exc.reason or str(exc)
    if exc.verify_code in _UNKNOWN_CA:
        return SecurityError(
            f"{where}: TLS certificate not trusted: {reason}; if this server uses "
            "its own CA, give it with ca_file: PATH"
        )
    return SecurityError(f"{where}: TLS certificate not trusted ({reason}); refusing to continue")


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What the TLS handshake settled: protocol version, cipher suite, and
    the server's certificate (DER; the parsed form ``ssl`` gives for a
    verified one, empty when there is none)."""

    version: str
    cipher: str
    certificate_der: bytes | None
    certificate: dict[str, object]


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
        self._quick_ack = False
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
                transport._implicit_tls(ssl_context)
        except BaseException:
            transport.close()
            raise
        return transport

    @property
    def is_tls(self) -> bool:
        return isinstance(self._sock, ssl.SSLSocket)

    @property
    def peer(self) -> str:
        """The address connected to (``192.0.2.1:995``, ``[::1]:110``); "" once closed."""
        try:
            address = self._sock.getpeername()
        except OSError:
            return ""
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def tls_info(self) -> TlsInfo | None:
        """The negotiated TLS parameters, or None on a plain connection."""
        sock = self._sock
        if not isinstance(sock, ssl.SSLSocket):
            return None
        cipher = sock.cipher()
        return TlsInfo(
            version=sock.version() or "",
            cipher=cipher[0] if cipher else "",
            certificate_der=sock.getpeercert(binary_form=True),
            certificate=dict(sock.getpeercert() or {}),
        )

    @property
    def quick_ack(self) -> bool:
        """Whether every read re-arms an immediate ACK (Linux TCP_QUICKACK).

        For servers that answer one command at a time (no PIPELINING, RFC
        2449 §6.6): such a server often writes a reply's status line and its
        body in two sends with Nagle's algorithm on (RFC 896), so the body
        waits for our ACK of the status line; a delayed ACK (RFC 1122
        §4.2.3.2) would cost up to 40 ms per message.  A pipelining session
        keeps its commands flowing, and the ACKs ride on them.  Setting it
        where the option does not exist (not Linux) does nothing.
        """
        return self._quick_ack

    @quick_ack.setter
    def quick_ack(self, on: bool) -> None:
        self._quick_ack = on and _TCP_QUICKACK is not None
        if self._quick_ack:
            self._ack_now()

    def _ack_now(self) -> None:
        """Ask the kernel to ACK the next segment at once; best effort."""
        assert _TCP_QUICKACK is not None
        with contextlib.suppress(OSError):
            # The plain-socket call: under TLS the option is on the same descriptor.
            socket.socket.setsockopt(self._sock, socket.IPPROTO_TCP, _TCP_QUICKACK, 1)

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
        try:
            self._handshake(ssl_context)
        except (OSError, ssl.SSLError) as exc:
            raise self._failure(exc, "negotiating TLS") from None

    def _implicit_tls(self, ssl_context: ssl.SSLContext) -> None:
        """:meth:`start_tls` on a fresh connection; raises TlsModeMismatch if the
        handshake failed because the port speaks plain POP3 (RFC 1939 greeting)."""
        try:
            self._handshake(ssl_context)
        except ssl.SSLCertVerificationError as exc:
            raise self._failure(exc, "negotiating TLS") from None
        except ssl.SSLError as exc:
            if self.ended() is None and greets_in_clear(self.host, self.port, self.probe_wait()):
                raise TlsModeMismatch(
                    f"{self.where}: port {self.port} speaks plain POP3: "
                    "use tls: starttls, or port 995"
                ) from None
            raise self._failure(exc, "negotiating TLS") from None
        except OSError as exc:
            raise self._failure(exc, "negotiating TLS") from None

    def _handshake(self, ssl_context: ssl.SSLContext) -> None:
        self._arm(None)
        with self._lock:
            if self._interrupted is not None:
                raise self._interrupted
            tls = ssl_context.wrap_socket(
                self._sock, server_hostname=self.host, do_handshake_on_connect=False
            )
            self._sock = tls
        tls.do_handshake()  # outside the lock, so interrupt() can wake it
        if isinstance(ssl_context, PinnedContext):
            self._check_pins(tls, ssl_context.pins)

    def _check_pins(self, tls: ssl.SSLSocket, pins: tuple[str, ...]) -> None:
        """SecurityError unless the peer certificate matches one of *pins*."""
        der = tls.getpeercert(binary_form=True)
        if der is None:
            raise SecurityError(f"{self.where}: the server sent no TLS certificate to pin")
        if not tlspin.matches(der, pins):
            shown = tlspin.cert_fingerprint(der)
            if any(pin.startswith("pin-sha256:") for pin in pins):
                with contextlib.suppress(ValueError):
                    shown += f" ({tlspin.spki_pin(der)})"
            raise SecurityError(
                f"{self.where}: TLS certificate {shown} does not match tls_fingerprint "
                f"({', '.join(pins)}); refusing to continue"
            )

    def probe_wait(self) -> float:
        """How long a probe of this port may take: PROBE_WAIT, cut short by
        ``timeout`` and the deadline (0 if the deadline has passed)."""
        wait = min(PROBE_WAIT, self.timeout)
        if self.deadline is not None:
            wait = min(wait, self.deadline.at - time.monotonic())
        return max(wait, 0.0)

    def readable_within(self, seconds: float) -> bool:
        """True once the peer has sent something (or closed) within *seconds*,
        or once this transport has ended (the next call then raises why);
        reads nothing.  Plain sockets only (before any TLS)."""
        if self.is_tls:
            raise ValueError("readable_within() is for a plain connection")
        if self.ended() is not None:
            return True
        try:
            ready, _, _ = select.select([self._sock], [], [], max(seconds, 0.0))
        except (OSError, ValueError):  # closed by close(): the next call says why
            return True
        return bool(ready)

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
            if self._quick_ack:
                self._ack_now()
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


# -- probes: what does this port speak? -----------------------------------------


def _probe(host: str, port: int, wait: float, hello: bytes, want: int) -> bytes:
    """Open a new connection, send *hello*, and return the first bytes (up to
    *want*) the peer sends within *wait* seconds; ``b""`` on any failure."""
    if wait <= 0:
        return b""
    end = time.monotonic() + wait
    try:
        with socket.create_connection((host, port), timeout=wait) as sock:
            if hello:
                sock.sendall(hello)
            got = b""
            while len(got) < want:
                left = end - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
                more = sock.recv(want - len(got))
                if not more:
                    break
                got += more
            return got
    except OSError:
        return b""


def greets_in_clear(host: str, port: int, wait: float) -> bool:
    """True if a new connection to *port* gets a plaintext POP3 greeting
    (``+OK``, RFC 1939 §4) within *wait* seconds, sending nothing."""
    return _probe(host, port, wait, b"", 3) == b"+OK"


def answers_tls(host: str, port: int, wait: float) -> bool:
    """True if a new connection to *port* that sends a TLS ClientHello gets a
    TLS record back (a handshake or an alert, RFC 8446 §5.1) within *wait*
    seconds.  The handshake goes no further: nothing is verified or trusted,
    and no credential is sent."""
    engine = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=host
    )
    with contextlib.suppress(ssl.SSLWantReadError):
        engine.do_handshake()
    head = _probe(host, port, wait, outgoing.read(), 2)
    # content type 22 (handshake) or 21 (alert), then the major version 3
    return len(head) == 2 and head[0] in (21, 22) and head[1] == 3
