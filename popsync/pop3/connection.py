"""The sans-I/O POP3 client connection: commands in, bytes out; bytes in, events out.

Usage (the session does the I/O)::

    conn = Connection()
    conn.receive_data(sock.recv(65536))       # b"" means the peer closed
    event = conn.next_event()                 # Greeting(...) or NEED_DATA
    sock.sendall(conn.send(Capa()))

Invariants:

* **Rule 1: every state transition is a row of** :data:`TRANSITIONS`,
  ``(state, command type, reply kind) -> next state``, and happens in
  :meth:`Connection._advance` -- nowhere else.  Which commands each state
  accepts is the other table, :data:`_ALLOWED`.
* Replies are matched to commands strictly in order through a FIFO of
  outstanding commands (RFC 2449 §6.6).  Only pipelinable commands may join
  a non-empty FIFO, and only once the caller has set :attr:`pipelining`
  after seeing the capability.  USER, PASS, APOP, AUTH, STLS, CAPA and QUIT
  always go alone, because their reply decides what may follow.
* Everything the server controls is bounded: a status line by
  ``max_line``; each listing (CAPA, UIDL, LIST) by its command's
  :class:`ListingLimits` -- line length, lines and octets, checked as it
  streams, so a listing is parsed piece by piece and never held raw; a
  body by the command's ``limit``; buffered bytes by ``max_line`` or the
  listing's line bound (bodies are streamed).
* Anything the server sends that the protocol does not allow raises
  :class:`RemoteProtocolError`; after that the connection is dead (state
  ``ERROR``) and every further call raises too.  A caller bug raises
  :class:`LocalProtocolError` naming the state.
* A *tracer*, if set, sees the dialog line by line -- ``("C", "PASS
  <redacted>")``, ``("S", "+OK ...")`` -- as :meth:`Command.trace` shows a
  command (secrets never) and server lines escaped and capped; a body is
  one ``<N octets of message body>`` line, never its content.
* After ``+OK`` to STLS the connection waits in ``STARTTLS`` for
  :meth:`start_tls`, which refuses to go on if the server already sent
  more plaintext (the STARTTLS command-injection class, CVE-2021-39272).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Mapping

from popsync.errors import (
    BodyLimitExceeded,
    LocalProtocolError,
    RemoteProtocolError,
    SecurityError,
    escape_server_text,
)
from popsync.pop3.commands import (
    Apop,
    Auth,
    AuthResponse,
    Capa,
    Command,
    Dele,
    List,
    Noop,
    Pass,
    Quit,
    Retr,
    Rset,
    Stat,
    Stls,
    Top,
    Uidl,
    User,
    Utf8,
)
from popsync.pop3.events import (
    NEED_DATA,
    BodyData,
    CapaListing,
    Challenge,
    ConnectionClosed,
    EndOfBody,
    Err,
    Event,
    Greeting,
    Listing,
    NeedData,
    Ok,
    ScanListing,
    UidListing,
    parse_resp_code,
)
from popsync.pop3.listing import (
    LISTING_LIMITS,
    CapaParser,
    ListingLimits,
    ListingParser,
    ScanParser,
    UidlParser,
    listing_parser,
)
from popsync.pop3.reader import BodyReader, take_line, take_listing_lines

#: Lenient default for reply lines: RFC 1939 §3 says 512, real servers exceed it.
DEFAULT_MAX_LINE = 64 * 1024

#: Receives each line of the dialog: ``("C", text)`` sent, ``("S", text)`` received.
Tracer = Callable[[str, str], None]


class State(enum.Enum):
    GREETING = "GREETING"  # waiting for the banner
    AUTHORIZATION = "AUTHORIZATION"
    STARTTLS = "STARTTLS"  # +OK to STLS seen; waiting for start_tls()
    TRANSACTION = "TRANSACTION"
    DONE = "DONE"  # QUIT answered, or the server closed where allowed
    ERROR = "ERROR"  # a protocol error happened; nothing more may be done


class Reply(enum.Enum):
    """What happened, as far as the state machine cares."""

    OK = "OK"  # a +OK status line: the greeting, or the reply to a command
    ERR = "ERR"  # a -ERR status line
    CLOSED = "CLOSED"  # the server closed with nothing outstanding
    TLS_READY = "TLS_READY"  # start_tls() found no plaintext after STLS's +OK
    VIOLATION = "VIOLATION"  # the server broke the protocol (or injected plaintext)


class _Phase(enum.Enum):
    STATUS = "STATUS"
    LISTING = "LISTING"
    BODY = "BODY"


_AUTH_COMMANDS: frozenset[type[Command]] = frozenset(
    {User, Pass, Apop, Auth, Capa, Stls, Utf8, Quit}
)
_TRANSACTION_COMMANDS: frozenset[type[Command]] = frozenset(
    {Stat, List, Uidl, Retr, Top, Dele, Noop, Rset, Capa, Quit}
)
#: Which commands each state accepts (RFC 1939 §§4-6, RFC 2449 §5, RFC 2595 §4).
_ALLOWED: dict[State, frozenset[type[Command]]] = {
    State.GREETING: frozenset(),
    State.AUTHORIZATION: _AUTH_COMMANDS,
    State.STARTTLS: frozenset(),
    State.TRANSACTION: _TRANSACTION_COMMANDS,
    State.DONE: frozenset(),
    State.ERROR: frozenset(),
}

#: Every state transition (RFC 1939 §§3-6, RFC 2595 §4, RFC 5034 §4); the
#: command type is None for what answers no command (the greeting, a close, a
#: violation).  A pair missing here leaves the state as it is.
TRANSITIONS: Mapping[tuple[State, type[Command] | None, Reply], State] = {
    (State.GREETING, None, Reply.OK): State.AUTHORIZATION,
    (State.GREETING, None, Reply.ERR): State.DONE,
    (State.AUTHORIZATION, Pass, Reply.OK): State.TRANSACTION,
    (State.AUTHORIZATION, Apop, Reply.OK): State.TRANSACTION,
    (State.AUTHORIZATION, Auth, Reply.OK): State.TRANSACTION,
    (State.AUTHORIZATION, Stls, Reply.OK): State.STARTTLS,
    (State.STARTTLS, Stls, Reply.TLS_READY): State.AUTHORIZATION,
    # QUIT ends the conversation whatever the answer (RFC 1939 §§5-6).
    (State.AUTHORIZATION, Quit, Reply.OK): State.DONE,
    (State.AUTHORIZATION, Quit, Reply.ERR): State.DONE,
    (State.TRANSACTION, Quit, Reply.OK): State.DONE,
    (State.TRANSACTION, Quit, Reply.ERR): State.DONE,
    # The server may hang up between replies; after that nothing comes.
    (State.AUTHORIZATION, None, Reply.CLOSED): State.DONE,
    (State.TRANSACTION, None, Reply.CLOSED): State.DONE,
    # A violation kills the connection in every state.
    **{(state, None, Reply.VIOLATION): State.ERROR for state in State if state is not State.ERROR},
}


class Connection:
    """One POP3 client connection's protocol state; does no I/O."""

    def __init__(
        self,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        listing_limits: Mapping[str, ListingLimits] | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        """*listing_limits* replaces the bounds of the listings it names
        (``"CAPA"``, ``"UIDL"``, ``"LIST"``); the others keep
        :data:`~popsync.pop3.listing.LISTING_LIMITS`.  *tracer* sees the
        dialog (see the module docstring)."""
        if max_line < 512:
            raise LocalProtocolError("max_line must be at least 512 (RFC 1939 §3)")
        self.max_line = max_line
        self.listing_limits: dict[str, ListingLimits] = {**LISTING_LIMITS, **(listing_limits or {})}
        #: Set by the caller once CAPA (over the final transport) lists PIPELINING.
        self.pipelining = False
        self.tracer = tracer
        self._state = State.GREETING
        self._buf = bytearray()
        self._eof = False
        self._pending: deque[Command] = deque()
        self._phase = _Phase.STATUS
        self._listing: ListingParser | None = None
        self._body: BodyReader | None = None
        self._body_bytes = 0
        self._body_octets = 0
        self._body_ended = False  # terminator consumed, EndOfBody not yet returned
        self._challenged = False  # an AUTH challenge awaits our AuthResponse

    # -- inspection ---------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def pending(self) -> tuple[Command, ...]:
        """Commands sent whose replies have not fully arrived, oldest first."""
        return tuple(self._pending)

    @property
    def trailing_data(self) -> bytes:
        """Bytes received but not yet parsed (after STLS +OK this must be empty)."""
        return bytes(self._buf)

    # -- sending -----------------------------------------------------------------

    def send(self, command: Command) -> bytes:
        """Queue *command* and return its bytes for the wire.

        Raises LocalProtocolError if the command is not allowed in the
        current state, or may not run ahead of the outstanding ones.
        """
        state = self._state
        if type(command) not in _ALLOWED[state]:
            raise LocalProtocolError(f"{command.name} is not allowed in state {state.value}")
        if self._pending and not (self.pipelining and command.pipelinable):
            waiting = self._pending[0].name
            raise LocalProtocolError(
                f"{command.name} cannot be sent while the reply to {waiting} is outstanding"
            )
        data = command.to_bytes()
        self._pending.append(command)
        if self.tracer is not None:
            self.tracer("C", command.trace())
        return data

    def send_auth_response(self, response: AuthResponse) -> bytes:
        """Answer the AUTH challenge just received (RFC 5034 §4)."""
        if not self._challenged:
            raise LocalProtocolError("no AUTH challenge is waiting for a response")
        self._challenged = False
        data = response.to_bytes()
        if self.tracer is not None:
            self.tracer("C", response.trace())
        return data

    def start_tls(self) -> None:
        """Record that the TLS handshake is about to start (after STLS +OK).

        Raises SecurityError if the server sent any byte after its ``+OK``:
        those arrived in plaintext and could be an attacker's injected replies
        (RFC 2595 §4; CVE-2021-39272).  Capabilities learnt before TLS are void
        afterwards, so :attr:`pipelining` is reset: send CAPA again.
        """
        if self._state is not State.STARTTLS:
            raise LocalProtocolError(f"start_tls() in state {self._state.value}")
        if self._buf:
            n = len(self._buf)
            self._advance(None, Reply.VIOLATION)
            raise SecurityError(
                f"server sent {n} plaintext byte(s) after accepting STLS; refusing to "
                "continue (possible STARTTLS injection attack)"
            )
        self.pipelining = False
        self._advance(Stls, Reply.TLS_READY)

    # -- receiving -----------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the server; ``b""`` means the server closed."""
        if self._eof and data:
            raise LocalProtocolError("data received after end of stream")
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Event | NeedData:
        """The next complete event, or NEED_DATA.

        Raises RemoteProtocolError when the server breaks the protocol.
        """
        if self._state is State.ERROR:
            raise RemoteProtocolError("connection is unusable after an earlier protocol error")
        try:
            if self._phase is _Phase.BODY:
                return self._next_body_event()
            if self._phase is _Phase.LISTING:
                return self._next_listing_event()
            return self._next_status_event()
        except RemoteProtocolError:
            self._advance(None, Reply.VIOLATION)
            raise

    def _advance(self, command: type[Command] | None, reply: Reply) -> None:
        """Move to the state :data:`TRANSITIONS` gives for *reply* to *command*."""
        self._state = TRANSITIONS.get((self._state, command, reply), self._state)

    def _expected(self) -> str:
        if self._state is State.GREETING:
            return "the greeting"
        return f"the reply to {self._pending[0].name}" if self._pending else "nothing"

    def _check_eof(self) -> NeedData:
        if self._eof:
            raise RemoteProtocolError(
                f"server closed the connection while we waited for {self._expected()}"
            )
        return NEED_DATA

    def _next_status_event(self) -> Event | NeedData:
        if self._state is State.STARTTLS:
            raise LocalProtocolError("call start_tls() and do the handshake first")
        if not self._pending and self._state is not State.GREETING:
            # Bytes that answer no command yet are left alone (they may be the
            # start of an early reply we pipelined for); at end of stream they
            # are a violation.
            if self._eof and self._buf:
                raise RemoteProtocolError("server sent data that answers no command")
            if self._eof:
                self._advance(None, Reply.CLOSED)
                return ConnectionClosed()
            return NEED_DATA
        line = take_line(self._buf, self.max_line)
        if line is None:
            return self._check_eof()
        return self._on_status(line)

    def _on_status(self, line: bytes) -> Event:
        """Interpret one status line: the greeting, or the reply to the oldest command."""
        if self.tracer is not None:
            self.tracer("S", escape_server_text(line))
        if self._state is State.GREETING:
            if line[:3].upper() == b"+OK":
                self._advance(None, Reply.OK)
                return Greeting(line[3:].lstrip(b" "))
            if line[:4].upper() == b"-ERR":
                self._advance(None, Reply.ERR)
                text = line[4:].lstrip(b" ")
                return Err(None, text, parse_resp_code(text))
            raise RemoteProtocolError("greeting does not start with +OK or -ERR")

        command = self._pending[0]
        if isinstance(command, Auth) and (line == b"+" or line.startswith(b"+ ")):
            # RFC 5034 §4: a continuation; the AUTH stays outstanding.
            self._challenged = True
            return Challenge(command, line[2:])
        head = line[:4].upper()
        if head[:3] == b"+OK" and (len(line) == 3 or line[3:4] == b" "):
            self._challenged = False
            self._on_ok(command)
            self._advance(type(command), Reply.OK)
            return Ok(command, line[4:])
        if head == b"-ERR" and (len(line) == 4 or line[4:5] == b" "):
            self._challenged = False
            self._pending.popleft()
            self._advance(type(command), Reply.ERR)
            text = line[5:]
            return Err(command, text, parse_resp_code(text))
        # CPython gh-95252: a line that is not a status where one is due means
        # the stream is out of step -- never guess, never DELE after this.
        raise RemoteProtocolError(f"expected +OK or -ERR in reply to {command.name}")

    def _on_ok(self, command: Command) -> None:
        """Start reading the listing or body a +OK announces, or retire *command*."""
        if command.multiline():
            if isinstance(command, Retr | Top):
                self._phase = _Phase.BODY
                self._body = BodyReader()
                self._body_bytes = 0
                self._body_octets = 0
            else:
                self._phase = _Phase.LISTING
                self._listing = listing_parser(command.name, self.listing_limits)
            return
        self._pending.popleft()

    def _next_listing_event(self) -> Event | NeedData:
        parser = self._listing
        assert parser is not None
        raw, done = take_listing_lines(self._buf)
        if raw:
            parser.feed(raw)  # checks every line and the totals at once
            if self.tracer is not None:
                for line in raw.split(b"\n")[:-1]:
                    self.tracer("S", escape_server_text(line.removesuffix(b"\r")))
        if not done:
            parser.check_unfinished(len(self._buf))
            return self._check_eof()
        command = self._pending.popleft()
        self._phase = _Phase.STATUS
        self._listing = None
        if self.tracer is not None:
            self.tracer("S", ".")
        return _listing_event(command, parser)

    def _next_body_event(self) -> Event | NeedData:
        assert self._body is not None
        command = self._pending[0]
        assert isinstance(command, Retr | Top)
        if self._body_ended:
            return self._end_body(command)
        chunk = self._body.read(self._buf)
        self._body_bytes += len(chunk.data)
        self._body_octets += chunk.octets
        if command.limit is not None and self._body_bytes > command.limit:
            raise BodyLimitExceeded(
                f"{command.name} {command.msg}: body exceeds its limit of "
                f"{command.limit} bytes; cut off",
                command.msg,
            )
        if chunk.data:
            # With the end already consumed, EndOfBody comes on the next call.
            self._body_ended = chunk.done
            return BodyData(command, chunk.data)
        if chunk.done:
            return self._end_body(command)
        return self._check_eof()

    def _end_body(self, command: Retr | Top) -> EndOfBody:
        self._pending.popleft()
        self._phase = _Phase.STATUS
        self._body = None
        self._body_ended = False
        if self.tracer is not None:
            self.tracer("S", f"<{self._body_octets} octets of message body>")
            self.tracer("S", ".")
        return EndOfBody(command, self._body_octets)


def _listing_event(command: Command, parser: ListingParser) -> Listing:
    """The event that hands the finished listing of *command* to the caller."""
    if isinstance(parser, UidlParser):
        return UidListing(command, parser.result)
    if isinstance(parser, ScanParser):
        return ScanListing(command, parser.result)
    assert isinstance(parser, CapaParser)
    return CapaListing(command, tuple(parser.result))
