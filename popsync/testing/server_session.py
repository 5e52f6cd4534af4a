"""One connection of the test POP3 server: the RFC 1939 state machine over a blocking socket.

Contract and invariants:

* One :class:`Session` per connection, run in its own thread by the server.
  Commands are read from a buffer, so pipelined input (many commands in one
  segment, RFC 2449 §6.6) is answered in order.  Replies are queued and
  written in large ``sendall`` calls: the queue is flushed only before the
  session would block on a read (or when it grows past :data:`FLUSH_AT`), so
  a pipelined burst of RETRs streams ready-made message bytes back to back.
  With ``write_each`` every piece is sent at once instead (a server that
  writes as it goes, Nagle's algorithm on).
* Deletions happen only in the UPDATE state, entered by QUIT from
  TRANSACTION (RFC 1939 §6).  A dropped connection, an idle timeout, a stop
  of the server, a hook that closes, or any fault that hangs up never removes
  a message.
* The maildrop lock is taken at login and released before the QUIT reply is
  sent (so a client that reconnects at once is not refused) and, in any case,
  before the socket is closed.
* Bounded: a command line longer than ``max_line_length`` closes the session;
  every socket operation has the per-socket ``idle_timeout`` (no global
  timeouts); :meth:`Session.interrupt` shuts the socket down from another
  thread, which wakes any blocked read or write, and every wait inside the
  session (stalls, trickled replies, endless bodies) also watches the
  server's stop event.
* Nothing a client sends is echoed into a reply, so replies stay within the
  512-octet limit of RFC 1939 §3 unless a fault asks otherwise.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from popsync.testing.faults import Faults
from popsync.testing.mailstore import MailStore, to_wire, top_of, with_unstuffed_dot
from popsync.testing.server_config import ServerConfig
from popsync.testing.server_state import CommandHook, Phase, SessionRecord, SessionState

__all__ = ["FLUSH_AT", "Session"]

logger = logging.getLogger(__name__)

CRLF = b"\r\n"
#: Queued reply bytes beyond which the session writes without waiting for a read.
FLUSH_AT = 1 << 20
#: How long a graceful close waits for the client's EOF (avoids a RST that could
#: destroy the last reply in the client's receive buffer).
LINGER_SECONDS = 1.0
_RECV_SIZE = 1 << 16
_ENDLESS_CHUNK = b"".join(
    b"endless body line %06d of a message that never ends\r\n" % i for i in range(1024)
)


class _Hangup(Exception):
    """End the session now; *abrupt* means no lingering for the client's EOF."""

    def __init__(self, *, abrupt: bool) -> None:
        super().__init__("hangup")
        self.abrupt = abrupt


class _Refusal(Exception):
    """The command fails with ``-ERR [code] text``; the session goes on."""

    def __init__(self, text: bytes, code: bytes | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.code = code


def _pad_line(prefix: bytes, suffix: bytes, total: int) -> bytes:
    """A line of exactly *total* bytes (CRLF included): prefix, filler, suffix."""
    filler = max(total - len(prefix) - len(suffix) - 2, 0)
    return prefix + b"x" * filler + suffix + CRLF


#: A huge listing (:attr:`Faults.huge_listing`) is made and sent in batches of this size.
_HUGE_BATCH = 1 << 20


def _huge_line(command: str, number: int, length: int) -> bytes:
    """Line *number* of a made-up listing of *command*, *length* octets with CRLF."""
    if command == "UIDL":
        prefix = b"%d " % number
        uid = b"%d-" % number  # distinct, padded to length with octets that are valid
        return prefix + uid.ljust(length - len(prefix) - 2, b"u") + CRLF
    if command == "LIST":
        return _pad_line(b"%d 100 " % number, b"", length)
    return _pad_line(b"X-HUGE-%d " % number, b"", length)


class Session:
    """Serves one connection; :meth:`run` returns when the connection is over."""

    def __init__(
        self,
        sock: socket.socket,
        record: SessionRecord,
        *,
        config: ServerConfig,
        faults: Faults,
        hook: CommandHook | None,
        store: MailStore,
        stopping: threading.Event,
        on_finished: Callable[[SessionRecord], None] | None = None,
        mailboxes: Mapping[str, MailStore] | None = None,
    ) -> None:
        self._sock = sock
        self._on_finished = on_finished
        self._sock_lock = threading.Lock()
        self._interrupted = False
        self._cfg = config
        self._faults = faults
        self._hook = hook
        self._store = store
        self._mailboxes = mailboxes
        self._stopping = stopping
        self.record = record
        self.state = SessionState(number=record.number, record=record)
        self._inbuf = bytearray()
        self._out: list[bytes] = []
        self._out_len = 0
        self._sasl_pending = False
        self._handlers: dict[str, tuple[frozenset[Phase], Callable[[bytes], None]]] = {}
        self._register_handlers()

    # -- life cycle -------------------------------------------------------

    def run(self) -> None:
        """Serve until QUIT, EOF, a fault, a timeout or :meth:`interrupt`; never raises."""
        abrupt = True
        try:
            self._sock.settimeout(self._cfg.idle_timeout)
            if self._cfg.tls == "implicit":
                self._start_tls()
            self._greet()
            self._serve()
        except _Hangup as hangup:
            abrupt = hangup.abrupt
        except OSError:  # EOF mid-send, reset, timeout, TLS failure: just end
            pass
        except Exception as exc:  # a hook or server bug: keep it for the test to see
            self.record.error = exc
            logger.exception("test POP3 session %d failed", self.record.number)
        finally:
            self._store.unlock(self)
            self._store.leave(self)
            # The record is final now; tell the server before lingering on close.
            if self._on_finished is not None:
                self._on_finished(self.record)
            self._close(abrupt=abrupt)

    def interrupt(self) -> None:
        """Wake the session from another thread by shutting its socket down."""
        with self._sock_lock:
            self._interrupted = True
            # The plain-socket shutdown, also for TLS sockets: it works on the
            # descriptor and so wakes a thread blocked inside OpenSSL.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def _close(self, *, abrupt: bool) -> None:
        with self._sock_lock:
            sock = self._sock
            self._interrupted = True
        # Outside the lock, so interrupt() can cut a linger short.
        try:
            # FIN after the queued data; no TLS close_notify (an abrupt end is
            # what the faults want, and unwrap() could block on the peer).
            socket.socket.shutdown(sock, socket.SHUT_WR)
            self._drain(sock, 0.0 if abrupt else LINGER_SECONDS)
        except OSError:
            pass
        finally:
            with self._sock_lock:
                sock.close()

    @staticmethod
    def _drain(sock: socket.socket, wait: float) -> None:
        # Read (and drop) what the client still sends, so closing with unread
        # input does not turn our FIN into a RST that destroys our last reply.
        sock.settimeout(wait)
        deadline = time.monotonic() + wait
        total = 0
        while total < FLUSH_AT:
            data = socket.socket.recv(sock, _RECV_SIZE)
            if not data or time.monotonic() > deadline:
                return
            total += len(data)

    def _start_tls(self) -> None:
        context = self._cfg.ssl_context
        assert context is not None  # checked by ServerConfig
        with self._sock_lock:
            if self._interrupted:
                raise _Hangup(abrupt=True)
            tls = context.wrap_socket(self._sock, server_side=True, do_handshake_on_connect=False)
            self._sock = tls
        tls.do_handshake()
        self.state.tls_active = True

    # -- I/O --------------------------------------------------------------

    def _queue(self, data: bytes) -> None:
        if self._cfg.write_each:
            self._send_now(data)
            return
        self._out.append(data)
        self._out_len += len(data)
        if self._out_len >= FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        if not self._out:
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        self._out_len = 0
        self._sock.sendall(data)

    def _send_now(self, data: bytes) -> None:
        self._flush()
        self._sock.sendall(data)

    def _next_line(self) -> bytes | None:
        """The next command line without its line end, or None at EOF."""
        limit = self._cfg.max_line_length
        while True:
            end = self._inbuf.find(b"\n")
            if end > limit or (end < 0 and len(self._inbuf) > limit):
                self._queue(b"-ERR line too long\r\n")
                self._flush()
                raise _Hangup(abrupt=True)
            if end >= 0:
                line = bytes(self._inbuf[:end])
                del self._inbuf[: end + 1]
                return line.removesuffix(b"\r")
            self._flush()
            if self._stopping.is_set():
                raise _Hangup(abrupt=True)
            data = self._sock.recv(_RECV_SIZE)
            if not data:
                return None
            self._inbuf += data

    def _wait(self, seconds: float) -> None:
        if seconds > 0:
            self._flush()
            if self._stopping.wait(seconds):
                raise _Hangup(abrupt=True)

    def _trickle(self, piece: int, seconds: float) -> None:
        """Send what is queued *piece* bytes at a time, *seconds* apart."""
        data = b"".join(self._out)
        self._out.clear()
        self._out_len = 0
        for start in range(0, len(data), piece):
            if start and self._stopping.wait(seconds):
                raise _Hangup(abrupt=True)
            self._sock.sendall(data[start : start + piece])

    # -- replies ----------------------------------------------------------

    def _ok(self, text: bytes = b"") -> None:
        self._queue(b"+OK " + text + CRLF if text else b"+OK\r\n")

    def _err_line(self, text: bytes, code: bytes | None) -> bytes:
        use_code = code is not None and self._cfg.resp_codes
        if code == b"AUTH" and not self._cfg.auth_resp_code:
            use_code = False
        prefix = b"-ERR [" + code + b"] " if use_code and code is not None else b"-ERR "
        return prefix + text + CRLF

    def _multi(self, status: bytes, lines: Sequence[bytes]) -> None:
        """A multi-line reply (RFC 1939 §3); *lines* carry no line ends and no dots."""
        body = b"".join(b"." + ln + CRLF if ln.startswith(b".") else ln + CRLF for ln in lines)
        self._queue(status + body + b".\r\n")

    # -- the conversation -------------------------------------------------

    def _greet(self) -> None:
        self._wait(self._faults.stall_for("GREETING"))
        error = self._faults.error_for("GREETING")
        if error is not None:
            self._send_now(error + CRLF)
            raise _Hangup(abrupt=False)
        if self._cfg.apop:
            token = secrets.token_hex(6).encode("ascii")
            host = self._cfg.banner_host.encode("ascii")
            self.state.banner = b"<%d.%d.%s@%s>" % (os.getpid(), self.record.number, token, host)
        suffix = b" " + self.state.banner if self.state.banner else b""
        if self._faults.overlong_line == "greeting":
            self._queue(_pad_line(b"+OK ", suffix, self._faults.overlong_length))
        else:
            self._ok(b"popsync test server ready" + suffix)
        trickle = self._faults.trickle_for("GREETING")
        if trickle is not None:
            self._trickle(*trickle)

    def _serve(self) -> None:
        while True:
            line = self._next_line()
            if line is None:  # the client went away: no UPDATE (RFC 1939 §6)
                raise _Hangup(abrupt=False)
            keyword = line.split(b" ", 1)[0].decode("ascii", "replace")
            trickle = None if self._sasl_pending else self._faults.trickle_for(keyword)
            if trickle is not None:
                self._flush()  # earlier replies at full speed; only this one trickles
            self._handle(line)
            if trickle is not None:
                self._trickle(*trickle)
            if self.state.close_requested:
                self._flush()
                raise _Hangup(abrupt=False)

    def _handle(self, line: bytes) -> None:
        self.record.commands.append((line, self.state.tls_active))
        continuation = self._sasl_pending
        keyword = line.split(b" ", 1)[0].decode("ascii", "replace").upper()
        if not continuation:
            self._wait(self._faults.stall_for(keyword))
        if self._hook is not None:
            raw = self._hook(self.state, line)
            if raw is not None:
                self._sasl_pending = False
                self._queue(raw)
                return
        try:
            if continuation:
                self._sasl_pending = False
                self._finish_plain(line, continuation=True)
                return
            error = self._faults.error_for(keyword)
            if error is not None:
                self._queue(error + CRLF)
                if keyword == "QUIT":  # answered, but no UPDATE
                    self.record.quit_received = True
                    self.state.close_requested = True
                return
            self._dispatch(keyword, line[len(keyword) + 1 :])
        except _Refusal as refusal:
            self._queue(self._err_line(refusal.text, refusal.code))

    def _dispatch(self, keyword: str, args: bytes) -> None:
        entry = self._handlers.get(keyword)
        if entry is None:
            raise _Refusal(b"unknown command")
        phases, handler = entry
        if self.state.phase not in phases:
            raise _Refusal(b"command not valid in this state")
        handler(args)

    def _register_handlers(self) -> None:
        auth = frozenset({Phase.AUTHORIZATION})
        trans = frozenset({Phase.TRANSACTION})
        both = auth | trans
        table: dict[str, tuple[frozenset[Phase], Callable[[bytes], None]]] = {
            "USER": (auth, self._cmd_user),
            "PASS": (auth, self._cmd_pass),
            "APOP": (auth, self._cmd_apop),
            "AUTH": (auth, self._cmd_auth),
            "STLS": (auth, self._cmd_stls),
            "UTF8": (auth, self._cmd_utf8),
            "CAPA": (both, self._cmd_capa),
            "QUIT": (both, self._cmd_quit),
            "STAT": (trans, self._cmd_stat),
            "LIST": (trans, self._cmd_list),
            "UIDL": (trans, self._cmd_uidl),
            "RETR": (trans, self._cmd_retr),
            "TOP": (trans, self._cmd_top),
            "DELE": (trans, self._cmd_dele),
            "NOOP": (trans, self._cmd_noop),
            "RSET": (trans, self._cmd_rset),
        }
        self._handlers = table

    # -- AUTHORIZATION (RFC 1939 §4, §7; RFC 5034; RFC 2595 §4) -------------

    def _guard_plaintext_auth(self, *, credentials: bool) -> None:
        # RFC 2595 §2.3: a server must be able to refuse cleartext passwords.
        if self._cfg.require_tls_for_auth and not self.state.tls_active:
            raise _Refusal(b"plaintext authentication disallowed without TLS", b"AUTH")
        if credentials and not self.state.tls_active:
            self.record.credentials_in_clear = True

    def _cmd_user(self, args: bytes) -> None:
        if not self._cfg.user:
            raise _Refusal(b"USER not supported")
        self._guard_plaintext_auth(credentials=False)
        if not args:
            raise _Refusal(b"USER needs a name")
        self.state.user = args.decode("utf-8", "surrogateescape")
        self._ok(b"send PASS")

    def _cmd_pass(self, args: bytes) -> None:
        if not self._cfg.user:
            raise _Refusal(b"PASS not supported")
        if self.state.user is None:
            raise _Refusal(b"send USER first")
        self._guard_plaintext_auth(credentials=True)
        # RFC 1939 §7: the whole rest of the line is the password (spaces too).
        name, self.state.user = self.state.user, None
        self._check_credentials(name, args)
        self._login(name)

    def _cmd_apop(self, args: bytes) -> None:
        if not self.state.banner:
            raise _Refusal(b"APOP not supported")
        self._guard_plaintext_auth(credentials=True)
        parts = args.split(b" ")
        if len(parts) != 2:
            raise _Refusal(b"usage: APOP name digest")
        name = parts[0].decode("utf-8", "surrogateescape")
        secret = self.state.banner + self._cfg.password.encode("utf-8")
        expected = hashlib.md5(secret, usedforsecurity=False).hexdigest().encode("ascii")
        if not self._known(name) or not hmac.compare_digest(parts[1].lower(), expected):
            raise _Refusal(b"invalid credentials", b"AUTH")
        self._login(name)

    def _cmd_auth(self, args: bytes) -> None:
        if not args:  # list the mechanisms, as Dovecot does for a bare AUTH
            self._multi(b"+OK\r\n", [m.encode("ascii") for m in self._cfg.sasl])
            return
        mechanism, _, initial = args.partition(b" ")
        name = mechanism.decode("ascii", "replace").upper()
        if name not in self._cfg.sasl or name != "PLAIN":
            raise _Refusal(b"unsupported SASL mechanism")
        self._guard_plaintext_auth(credentials=bool(initial))
        if initial:
            self._finish_plain(initial, continuation=False)
        else:  # RFC 5034 §4: an empty challenge, the client answers on the next line
            self._queue(b"+ \r\n")
            self._sasl_pending = True

    def _finish_plain(self, response: bytes, *, continuation: bool) -> None:
        if continuation:
            if response == b"*":  # RFC 5034 §4: the client cancels
                raise _Refusal(b"authentication cancelled")
            self._guard_plaintext_auth(credentials=True)
        try:
            decoded = b"" if response == b"=" else base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            raise _Refusal(b"invalid base64") from None
        parts = decoded.split(b"\0")
        if len(parts) != 3 or parts[0] not in (b"", parts[1]):  # RFC 4616 §2
            raise _Refusal(b"invalid PLAIN response", b"AUTH")
        name = parts[1].decode("utf-8", "surrogateescape")
        self._check_credentials(name, parts[2])
        self._login(name)

    def _check_credentials(self, name: str, password: bytes) -> None:
        good = hmac.compare_digest(password, self._cfg.password.encode("utf-8"))
        if not self._known(name) or not good:
            raise _Refusal(b"invalid credentials", b"AUTH")

    def _known(self, name: str) -> bool:
        """Whether *name* is a user: the one username, or a key of the mailboxes."""
        if self._mailboxes is not None:
            return name in self._mailboxes
        return name == self._cfg.username

    def _login(self, name: str) -> None:
        # RFC 1939 §4: lock, then number the messages 1..n from a snapshot.
        if self._mailboxes is not None:
            self._store = self._mailboxes[name]
        self.record.user = name
        self.record.overlapped = self._store.enter(self) > 0
        if self._cfg.exclusive_lock and not self._store.try_lock(self):
            raise _Refusal(b"maildrop locked", b"IN-USE")
        state = self.state
        state.messages = self._store.messages()
        if self._faults.changing_uids:
            salt = b"%d.%s:" % (state.number, secrets.token_hex(4).encode("ascii"))
            state.uids = [
                hashlib.sha256(salt + m.uid).hexdigest()[:24].encode("ascii")
                for m in state.messages
            ]
        else:
            state.uids = [m.uid for m in state.messages]
        state.deleted = set()
        state.retrieved = set()
        state.phase = Phase.TRANSACTION
        state.user = name
        self.record.authenticated = True
        count, octets = self._totals()
        self._ok(b"logged in, %d messages (%d octets)" % (count, octets))

    def _cmd_utf8(self, args: bytes) -> None:
        if not self._cfg.utf8_wrapper:
            raise _Refusal(b"unknown command")
        self.state.utf8 = True
        self._ok(b"UTF8 enabled")

    def _cmd_stls(self, args: bytes) -> None:
        if not self._cfg.stls or self.state.tls_active:
            raise _Refusal(b"STLS not available")
        # RFC 2595 §4: the handshake starts right after the CRLF of +OK.  An
        # injection fault rides in the same send(), as a MITM's bytes would.
        self._send_now(b"+OK Begin TLS\r\n" + self._faults.inject_after_stls)
        # Anything the client pipelined after STLS crossed in clear: record it,
        # then drop it unprocessed (the CVE-2011-0411 class of injection).
        for leftover in bytes(self._inbuf).split(b"\n"):
            if leftover:
                self.record.commands.append((leftover.removesuffix(b"\r"), False))
        self._inbuf.clear()
        self._start_tls()

    def _capabilities(self) -> list[bytes]:
        cfg, faults, state = self._cfg, self._faults, self.state
        hide_auth = cfg.require_tls_for_auth and not state.tls_active
        caps = [b"CAPA"]
        caps += [b"TOP"] if cfg.top else []
        caps += [b"USER"] if cfg.user and not hide_auth else []
        if cfg.sasl and not hide_auth:
            caps.append(b"SASL " + " ".join(cfg.sasl).encode("ascii"))
        caps += [b"RESP-CODES"] if cfg.resp_codes else []
        caps += [b"AUTH-RESP-CODE"] if cfg.auth_resp_code else []
        caps += [b"PIPELINING"] if cfg.pipelining else []
        caps += [b"UIDL"] if cfg.uidl and not faults.no_uidl else []
        caps += [b"UTF8"] if cfg.utf8_wrapper else []
        if cfg.login_delay is not None:
            caps.append(b"LOGIN-DELAY %d" % cfg.login_delay)
        if cfg.expire is not None:
            caps.append(b"EXPIRE " + cfg.expire.encode("ascii"))
        if cfg.stls and not state.tls_active and state.phase is Phase.AUTHORIZATION:
            caps.append(b"STLS")
        caps.append(b"IMPLEMENTATION popsync-testserver")
        if faults.overlong_line == "capa":
            caps.append(_pad_line(b"X-OVERLONG ", b"", faults.overlong_length)[:-2])
        return caps

    def _cmd_capa(self, args: bytes) -> None:
        if self._huge("CAPA"):
            self._stream_huge_listing(b"+OK capability list follows\r\n")
            return
        self._multi(b"+OK capability list follows\r\n", self._capabilities())

    def _huge(self, command: str) -> bool:
        huge = self._faults.huge_listing
        return huge is not None and huge[0] == command

    def _stream_huge_listing(self, status: bytes) -> None:
        """*status*, then the listing :attr:`Faults.huge_listing` describes, made as it goes."""
        assert self._faults.huge_listing is not None
        command, lines, length = self._faults.huge_listing
        self._send_now(status)
        batch = bytearray()
        for number in range(1, lines + 1):
            batch += _huge_line(command, number, length)
            if len(batch) >= _HUGE_BATCH:
                if self._stopping.is_set():
                    raise _Hangup(abrupt=True)
                self._sock.sendall(batch)  # raises once the client has gone
                batch.clear()
        self._queue(bytes(batch) + b".\r\n")

    # -- TRANSACTION (RFC 1939 §5, §7) --------------------------------------

    def _number(self, token: bytes) -> int:
        """A message number that exists and is not marked deleted."""
        if not token.isdigit() or len(token) > 9:
            raise _Refusal(b"no such message")
        number = int(token)
        if not 1 <= number <= len(self.state.messages):
            raise _Refusal(b"no such message")
        if number in self.state.deleted:
            raise _Refusal(b"message %d already deleted" % number)
        return number

    @staticmethod
    def _split(args: bytes, low: int, high: int) -> list[bytes]:
        parts = args.split()
        if not low <= len(parts) <= high:
            raise _Refusal(b"wrong number of arguments")
        return parts

    def _live(self) -> list[int]:
        return [n for n in range(1, len(self.state.messages) + 1) if n not in self.state.deleted]

    def _size(self, number: int) -> int:
        """The size LIST reports (faults may lie about it)."""
        wrong = self._faults.wrong_list_size.get(number)
        if wrong is not None:
            return wrong
        if self._faults.unstuffed_dot_line == number:
            return self.state.messages[number - 1].size + 3
        return self.state.messages[number - 1].size

    def _totals(self) -> tuple[int, int]:
        live = self._live()
        return len(live), sum(self._size(n) for n in live)

    def _cmd_stat(self, args: bytes) -> None:
        self._split(args, 0, 0)
        self._ok(b"%d %d" % self._totals())

    def _cmd_list(self, args: bytes) -> None:
        parts = self._split(args, 0, 1)
        if parts:
            number = self._number(parts[0])
            self._ok(b"%d %d" % (number, self._size(number)))
            return
        if self._huge("LIST"):
            self._stream_huge_listing(b"+OK scan listing follows\r\n")
            return
        count, octets = self._totals()
        lines = [b"%d %d" % (n, self._size(n)) for n in self._live()]
        self._multi(b"+OK %d messages (%d octets)\r\n" % (count, octets), lines)

    def _cmd_uidl(self, args: bytes) -> None:
        if not self._cfg.uidl or self._faults.no_uidl:
            raise _Refusal(b"UIDL not supported")
        parts = self._split(args, 0, 1)
        overlong = self._faults.overlong_line == "uidl"
        length = self._faults.overlong_length
        if parts:
            number = self._number(parts[0])
            if overlong:
                self._queue(_pad_line(b"+OK %d " % number, b"", length))
            else:
                self._ok(b"%d %s" % (number, self.state.uids[number - 1]))
            return
        if self._huge("UIDL"):
            self._stream_huge_listing(b"+OK unique-id listing follows\r\n")
            return
        lines = [b"%d %s" % (n, self.state.uids[n - 1]) for n in self._live()]
        if overlong and lines:
            lines[0] = _pad_line(lines[0].split(b" ")[0] + b" ", b"", length)[:-2]
        self._multi(b"+OK unique-id listing follows\r\n", lines)

    def _wire(self, number: int) -> bytes:
        message = self.state.messages[number - 1]
        if self._faults.unstuffed_dot_line == number:
            return with_unstuffed_dot(message)
        if self._cfg.utf8_wrapper and not self.state.utf8 and _has_8bit_headers(message.data):
            return to_wire(_utf8_wrapper(message.data))[0]
        return message.wire

    def _cmd_retr(self, args: bytes) -> None:
        number = self._number(self._split(args, 1, 1)[0])
        faults = self._faults
        if faults.endless_body == number:
            self._stream_endless()
        wire = self._wire(number)
        size = self._size(number)  # the status agrees with LIST, even a lying one
        if faults.overlong_line == "retr_status":
            status = _pad_line(b"+OK %d octets " % size, b"", faults.overlong_length)
        else:
            status = b"+OK %d octets\r\n" % size
        self.state.retrieved.add(number)
        if faults.drop_during_retr is not None and faults.drop_during_retr[0] == number:
            self._send_now(status + wire[: faults.drop_during_retr[1]])
            raise _Hangup(abrupt=True)
        self._queue(status)
        self._queue(wire)

    def _stream_endless(self) -> None:
        self._send_now(b"+OK message follows\r\nSubject: endless\r\n\r\n")
        while not self._stopping.is_set():
            self._sock.sendall(_ENDLESS_CHUNK)
        raise _Hangup(abrupt=True)

    def _cmd_top(self, args: bytes) -> None:
        if not self._cfg.top:
            raise _Refusal(b"TOP not supported")
        first, count = self._split(args, 2, 2)
        number = self._number(first)
        if not count.isdigit() or len(count) > 9:
            raise _Refusal(b"invalid line count")
        wire = self._wire(number)
        self._queue(b"+OK top of message follows\r\n" + top_of(wire, int(count)))

    def _cmd_dele(self, args: bytes) -> None:
        number = self._number(self._split(args, 1, 1)[0])
        self.state.deleted.add(number)  # only marked; removal happens in UPDATE
        self._ok(b"message %d deleted" % number)

    def _cmd_noop(self, args: bytes) -> None:
        self._split(args, 0, 0)
        self._ok()

    def _cmd_rset(self, args: bytes) -> None:
        self._split(args, 0, 0)
        self.state.deleted.clear()
        self._ok(b"maildrop has %d messages (%d octets)" % self._totals())

    # -- QUIT and UPDATE (RFC 1939 §6) ---------------------------------------

    def _cmd_quit(self, args: bytes) -> None:
        self.record.quit_received = True
        if self.state.phase is not Phase.TRANSACTION:  # QUIT in AUTHORIZATION: no UPDATE
            self._ok(b"bye")
            self._flush()
            raise _Hangup(abrupt=False)
        removed = self._update()
        self._store.unlock(self)
        self._store.leave(self)
        if self._faults.drop_quit_reply:
            self._flush()
            raise _Hangup(abrupt=True)
        if self._faults.quit_error:
            self._queue(b"-ERR some deleted messages not removed\r\n")
        else:
            self._ok(b"bye, %d messages removed" % removed)
        self._flush()
        raise _Hangup(abrupt=False)

    def _update(self) -> int:
        self.state.phase = Phase.UPDATE
        marked = [] if self._faults.ignore_dele else sorted(self.state.deleted)
        if self._faults.quit_error:  # "some or none" may be removed; we remove half
            marked = marked[: len(marked) // 2]
        removed = self._store.discard(self.state.messages[n - 1] for n in marked)
        self.record.deleted.extend(m.uid for m in removed)
        if self._cfg.mbox_status:
            for n in sorted(self.state.retrieved - set(marked)):
                message = self.state.messages[n - 1]
                self._store.rewrite(message, _with_status(message.data, n))
        return len(removed)


def _has_8bit_headers(data: bytes) -> bool:
    end = data.find(b"\n\n")
    head = data if end < 0 else data[:end]
    return any(byte > 0x7F for byte in head)


def _utf8_wrapper(data: bytes) -> bytes:
    """A "cannot display" MIME message standing in for *data*, new boundary each time."""
    boundary = secrets.token_hex(8).encode("ascii")
    return (
        b"From: Mail Delivery Subsystem <postmaster@popsync.test>\n"
        b"Subject: message with 8-bit headers\n"
        b"MIME-Version: 1.0\n"
        b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\n\n'
        b"--" + boundary + b"\nContent-Type: text/plain\n\n"
        b"This message cannot be displayed by your mail client.\n"
        b"--" + boundary + b"--\n"
    )


def _with_status(data: bytes, number: int) -> bytes:
    """*data* with the status fields an mbox server writes after a session."""
    fields = b"Status: RO\nX-UID: %d\n" % number
    end = data.find(b"\n\n")
    if end < 0:
        return data + b"\n" + fields
    return data[: end + 1] + fields + data[end + 1 :]
