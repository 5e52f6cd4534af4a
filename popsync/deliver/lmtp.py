"""An LMTP server (RFC 2033) as a delivery target: Dovecot, Cyrus, Postfix's lmtp.

One LMTP session serves a whole poll: opened on the first commit, closed
with QUIT in :meth:`LmtpTarget.close`.  Per message: ``MAIL FROM:<sender>``
(the message's Return-Path address, else the null sender ``<>``), ``RCPT
TO:<recipient>``, ``DATA`` -- pipelined when the server offers PIPELINING
(RFC 2920) -- then the body with CRLF line ends and dot-stuffing (RFC 5321
§4.5.2), streamed from the spool file, and ``.``.  With one recipient,
RFC 2033 §4.2 gives exactly one reply after the ``.``: 2xx is a
:class:`Receipt` (the server's text, typically naming its queue id), 4xx a
temporary and 5xx a permanent :class:`Refusal`.  A 4xx or 5xx to MAIL or
RCPT refuses the message likewise (the transaction is then reset with
RSET).  A broken, slow or misbehaving connection raises DeliveryError: the
poll fails, nothing is recorded, and the message is fetched again next time.

Why not :class:`smtplib.LMTP`: its ``data()`` and ``sendmail()`` take the
whole message as one ``bytes``, so a 200 MB message would be held in memory
two or three times over; its reply reader has no overall deadline (a server
trickling one byte per timeout period holds it forever) and no cap on the
lines of one reply.  The client here streams the body in spool-sized chunks
and bounds every reply: each line's length (:data:`MAX_LINE`), the lines of
a reply (:data:`MAX_REPLY_LINES`) and the time it may take (the target's
timeout).

Stored messages end with LF; one without a final line end gets CRLF added
before the closing ``.``, as SMTP requires, so that message is stored with
one more line end than the server sent.

An LMTP server cannot be asked afterwards what it delivered:
:attr:`LmtpTarget.exactly_once` is False.  A crash after the ``.`` and
before the ledger records the reply means the message is delivered once
more on the next poll -- one duplicate, never a loss; ``batch = 1`` keeps
that window one message wide.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from popsync import failpoints
from popsync.deliver.base import Draft, Held, Pending, Receipt, Refusal
from popsync.deliver.spool import SpoolDraft
from popsync.errors import DeliveryError, escape_server_text
from popsync.identity import HEADER_CAP

__all__ = [
    "MAX_LINE",
    "MAX_REPLY_LINES",
    "DataEncoder",
    "LmtpTarget",
    "open_lmtp_target",
    "parse_address",
    "return_path",
]

#: Longest reply line accepted, CRLF included (RFC 5321 §4.5.3.1.5 says 512;
#: real servers' texts run longer, so there is room, but not for a flood).
MAX_LINE = 4096
#: Most lines one reply may have (an LHLO reply lists a dozen extensions).
MAX_REPLY_LINES = 100
#: Longest receipt or refusal text kept from a reply.
_TEXT = 200
_RECV = 16 << 10
#: Seconds QUIT may take when the target closes.
_QUIT_TIMEOUT = 5.0
#: An address as it may appear in MAIL FROM / RCPT TO here: printable ASCII,
#: no spaces or angle brackets (RFC 5321 §4.1.2, without quoted forms).
_ADDRESS = re.compile(rb"[!-;=?-~]{1,254}")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


@dataclass(frozen=True, slots=True)
class Reply:
    """One (possibly multi-line) reply: its code and the text of each line."""

    code: int
    lines: tuple[bytes, ...]

    @property
    def text(self) -> str:
        """The reply as one escaped, capped line: ``550 5.1.1 <x> unknown``."""
        joined = b" ".join(line.strip() for line in self.lines)
        return escape_server_text(f"{self.code} ".encode() + joined, _TEXT)


def parse_address(address: str) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    """``unix:/path`` or ``host:port`` (``[v6]:port``) as a socket family and address.

    Raises ValueError naming what is wrong.
    """
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError(f"{address!r}: a unix socket path must be absolute")
        return socket.AF_UNIX, path
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r}: give unix:/path/to/socket or host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return socket.AF_UNSPEC, (host, int(port))


def return_path(head: bytes) -> bytes:
    """The address of the first ``Return-Path:`` field of a header section, or b"".

    Only a plain address (see :data:`_ADDRESS`) is used; anything else --
    ``<>``, a quoted local part, 8-bit bytes -- gives the null sender.
    """
    end = head.find(b"\n\n")
    section = head if end < 0 else head[: end + 1]
    if section.startswith(b"\n"):
        return b""
    unfolded = re.sub(rb"\r?\n[ \t]", b" ", section)
    for line in unfolded.split(b"\n"):
        field, colon, value = line.partition(b":")
        if colon and field.strip().lower() == b"return-path":
            address = value.strip().removeprefix(b"<").removesuffix(b">").strip()
            return address if _ADDRESS.fullmatch(address) else b""
    return b""


class DataEncoder:
    """Stored form (LF line ends) to SMTP DATA: CRLF line ends, leading dots doubled.

    Works chunk by chunk: whether a chunk starts a line is carried over.
    """

    def __init__(self) -> None:
        self._line_start = True

    def encode(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        out = chunk.replace(b"\n.", b"\n..")
        if self._line_start and chunk.startswith(b"."):
            out = b"." + out
        self._line_start = chunk.endswith(b"\n")
        return out.replace(b"\n", b"\r\n")

    def end(self) -> bytes:
        """The terminator (a line end first if the message lacked its last one)."""
        return b".\r\n" if self._line_start else b"\r\n.\r\n"


class _Connection:
    """A socket with deadline-bounded, size-bounded reply reading.

    Every method raises DeliveryError for a lost connection, a timeout or a
    reply that breaks the rules.
    """

    def __init__(self, sock: socket.socket, address: str, timeout: float) -> None:
        self.sock = sock
        self.address = address
        self.timeout = timeout
        self._buf = bytearray()
        #: The server said 421: it is closing the session (RFC 5321 §3.8).
        self.closing = False

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self.timeout)  # sendall: a bound on the whole call
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise self.error(f"did not take data within {self.timeout:g} s") from None
        except OSError as exc:
            raise self.error(f"connection lost: {exc.strerror or exc}") from None

    def reply(self) -> Reply:
        deadline = time.monotonic() + self.timeout
        code: bytes | None = None
        lines: list[bytes] = []
        while True:
            line = self._line(deadline)
            if not re.fullmatch(rb"[2-5][0-9][0-9]([ -].*)?", line, re.DOTALL):
                raise self.error(f"sent a malformed reply: {escape_server_text(line)}")
            if code is not None and line[:3] != code:
                raise self.error("changed the reply code within one reply")
            code = line[:3]
            lines.append(line[4:])
            if line[3:4] != b"-":
                self.closing = self.closing or code == b"421"
                return Reply(int(code), tuple(lines))
            if len(lines) >= MAX_REPLY_LINES:
                raise self.error(f"sent a reply of more than {MAX_REPLY_LINES} lines")

    def _line(self, deadline: float) -> bytes:
        while True:
            end = self._buf.find(b"\n", 0, MAX_LINE)
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                return line.removesuffix(b"\r")
            if len(self._buf) >= MAX_LINE:
                raise self.error(f"sent a reply line longer than {MAX_LINE} octets")
            self._recv(deadline)

    def _recv(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise self.error(f"did not answer within {self.timeout:g} s")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(_RECV)
        except TimeoutError:
            raise self.error(f"did not answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise self.error(f"connection lost: {exc.strerror or exc}") from None
        if not chunk:
            raise self.error("closed the connection")
        self._buf += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def error(self, what: str) -> DeliveryError:
        return DeliveryError(f"LMTP server {self.address} {what}")


class _Session:
    """One LMTP session: greeting and LHLO done, ready for transactions."""

    def __init__(self, conn: _Connection, extensions: frozenset[str]) -> None:
        self.conn = conn
        self.extensions = extensions

    def transaction(
        self, sender: bytes, recipient: bytes, body: Iterable[bytes]
    ) -> Receipt | Refusal:
        """Deliver one message to *recipient*; raises DeliveryError (see the module doc)."""
        conn = self.conn
        params = b" BODY=8BITMIME" if "8BITMIME" in self.extensions else b""
        commands = [
            b"MAIL FROM:<" + sender + b">" + params + b"\r\n",
            b"RCPT TO:<" + recipient + b">\r\n",
            b"DATA\r\n",
        ]
        pipelined = "PIPELINING" in self.extensions
        if pipelined:
            conn.send(b"".join(commands))
        replies: list[Reply] = []
        for command in commands:
            if not pipelined:
                conn.send(command)
            replies.append(reply := conn.reply())
            if conn.closing or (reply.code >= 400 and not pipelined):
                break  # after 421 nothing more comes; unpipelined, stop at a refusal
        refused = _envelope_refusal(replies)
        if refused is not None:
            if replies[-1].code == 354:
                raise conn.error("accepted DATA for a refused envelope")
            if not conn.closing:
                conn.send(b"RSET\r\n")
                conn.reply()
            return refused
        for reply, wanted in zip(replies, (2, 2, 3), strict=True):
            if reply.code // 100 != wanted:
                raise conn.error(f"answered out of turn: {reply.text}")
        return self._data(body)

    def _data(self, body: Iterable[bytes]) -> Receipt | Refusal:
        conn = self.conn
        encoder = DataEncoder()
        for chunk in body:
            conn.send(encoder.encode(chunk))
            failpoints.failpoint("lmtp_mid_data")
        conn.send(encoder.end())
        failpoints.failpoint("lmtp_after_dot")
        reply = conn.reply()
        if reply.code < 300:
            return Receipt(reply.text)
        if reply.code >= 400:
            return Refusal(f"after DATA: {reply.text}", temporary=reply.code < 500)
        raise conn.error(f"answered the message with {reply.text}")

    def quit(self) -> None:
        """Say QUIT and close; never raises."""
        self.conn.timeout = min(self.conn.timeout, _QUIT_TIMEOUT)
        with contextlib.suppress(DeliveryError):
            self.conn.send(b"QUIT\r\n")
            self.conn.reply()
        self.conn.close()


def _envelope_refusal(replies: Sequence[Reply]) -> Refusal | None:
    """The refusal of the first MAIL, RCPT or DATA reply that is 4xx or 5xx, if any."""
    for step, reply in zip(("MAIL FROM", "RCPT TO", "DATA"), replies, strict=False):
        if reply.code >= 400:
            return Refusal(f"{step}: {reply.text}", temporary=reply.code < 500)
    return None


def _lhlo_name() -> str:
    name = socket.gethostname()
    return name if _HOSTNAME.fullmatch(name) else "localhost"


def connect(address: str, timeout: float) -> _Session:
    """Open an LMTP session: connect, read the greeting, say LHLO.

    Raises DeliveryError if the server cannot be reached or does not greet
    with 220 and answer LHLO with 250.
    """
    try:
        family, sockaddr = parse_address(address)
    except ValueError as exc:
        raise DeliveryError(f"lmtp: {exc}") from None
    try:
        if family == socket.AF_UNIX:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(sockaddr)
            except BaseException:
                sock.close()
                raise
        else:
            assert isinstance(sockaddr, tuple)
            sock = socket.create_connection(sockaddr, timeout=timeout)
    except OSError as exc:
        raise DeliveryError(
            f"LMTP server {address}: cannot connect: {exc.strerror or exc}"
        ) from None
    conn = _Connection(sock, address, timeout)
    try:
        greeting = conn.reply()
        if greeting.code != 220:
            raise conn.error(f"refused the session: {greeting.text}")
        conn.send(f"LHLO {_lhlo_name()}\r\n".encode("ascii"))
        lhlo = conn.reply()
        if lhlo.code != 250:
            raise conn.error(f"refused LHLO: {lhlo.text}")
    except BaseException:
        conn.close()
        raise
    extensions = frozenset(
        line.split(b" ", 1)[0].decode("ascii", "replace").upper() for line in lhlo.lines[1:]
    )
    return _Session(conn, extensions)


class LmtpTarget:
    """One poll's deliveries to one recipient of an LMTP server."""

    kind = "lmtp"
    batch = 1
    exactly_once = False

    def __init__(
        self, address: str, recipient: bytes, *, timeout: float, warn: Callable[[str], None]
    ) -> None:
        self.address = address
        self.recipient = recipient
        self.timeout = timeout
        self.warn = warn
        self._session: _Session | None = None
        self._drafts: list[SpoolDraft] = []

    def reserve(self, name: str) -> None:
        pass  # the session opens at the first commit

    def begin(self, name: str, uid: bytes) -> SpoolDraft:
        draft = SpoolDraft(name)
        self._drafts.append(draft)
        return draft

    def end(self, draft: Draft) -> None:
        pass  # delivered at commit, once the ledger may record the answer

    def intent(self, draft: Draft) -> str | None:
        return None  # nothing could find the copy again

    def commit(self, drafts: Sequence[Draft]) -> list[Receipt | Refusal]:
        """One LMTP transaction per draft; raises DeliveryError (the session is then gone)."""
        results: list[Receipt | Refusal] = []
        for draft in drafts:
            assert isinstance(draft, SpoolDraft)
            results.append(self._deliver(draft))
            draft.abort()
            with contextlib.suppress(ValueError):
                self._drafts.remove(draft)
        return results

    def _deliver(self, draft: SpoolDraft) -> Receipt | Refusal:
        if self._session is None:
            self._session = connect(self.address, self.timeout)
        session = self._session
        try:
            result = session.transaction(
                return_path(draft.head(HEADER_CAP)), self.recipient, draft.chunks()
            )
        except BaseException:
            self._session = None
            session.conn.close()
            raise
        if session.conn.closing:
            self._session = None  # the server is closing the session
            session.conn.close()
        return result

    def recover(self, pending: Sequence[Pending]) -> list[Held]:
        return []  # an LMTP server cannot be asked what it delivered

    def close(self) -> None:
        for draft in self._drafts:
            draft.abort()
        self._drafts.clear()
        if self._session is not None:
            self._session.quit()
            self._session = None


def _is_loopback(host: str) -> bool:
    """Whether *host* names this machine without DNS (``localhost`` or a loopback IP)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_recipient(recipient: str) -> bytes:
    """*recipient* as it goes into ``RCPT TO:<...>``; ValueError if it cannot."""
    raw = recipient.encode("utf-8", "surrogateescape")
    if not _ADDRESS.fullmatch(raw):
        raise ValueError(f"{recipient!r} is not a plain address (printable ASCII, no spaces or <>)")
    return raw


@contextmanager
def open_lmtp_target(
    address: str, recipient: str, *, timeout: float, warn: Callable[[str], None]
) -> Iterator[LmtpTarget]:
    """The LMTP server at *address* (``unix:/path`` or ``host:port``) as one poll's target.

    No connection is made until the first message is delivered; LMTP has no
    TLS here, so *warn* is told when the address is not this machine.  Raises
    DeliveryError at once for an address or recipient that cannot work.
    """
    try:
        _, sockaddr = parse_address(address)
        rcpt = check_recipient(recipient)
    except ValueError as exc:
        raise DeliveryError(f"lmtp: {exc}") from None
    if isinstance(sockaddr, tuple) and not _is_loopback(sockaddr[0]):
        warn(f"LMTP to {address} is not encrypted: mail crosses the network in clear")
    target = LmtpTarget(address, rcpt, timeout=timeout, warn=warn)
    try:
        yield target
    finally:
        target.close()
