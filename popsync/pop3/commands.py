"""POP3 commands as frozen values, and their exact wire form.

A command knows four things about itself: the bytes it becomes
(:meth:`Command.to_bytes`), whether its reply is multi-line
(:meth:`Command.multiline`), whether it may run ahead of earlier
replies when the server advertises PIPELINING (RFC 2449 §6.6), and how it
may be shown in a log (:meth:`Command.trace`).  A command whose arguments
carry a secret says so where it is declared (:attr:`Command.public_args`),
so the dialog log can never print it: ``PASS <redacted>``.  Every line a
client sends inside an AUTH exchange is a secret (:class:`AuthResponse`),
whatever the mechanism, so a new SASL mechanism cannot leak by accident.  Commands
that change who we are or how we talk (USER, PASS, APOP, AUTH, STLS, QUIT)
never run ahead: their reply decides what may be sent next.

Arguments are validated here, before any byte is produced, so a secret or
user name holding CR, LF or NUL can never smuggle a second command onto the
wire (``secret\\r\\nDELE 1``): that raises :class:`LocalProtocolError`.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import ClassVar

from popsync.errors import LocalProtocolError, escape_server_text

#: RFC 2449 §4: a command line is at most 255 octets including the CRLF.
MAX_COMMAND_LINE = 255

_FORBIDDEN = (b"\r", b"\n", b"\x00")

#: What a log shows in place of a secret argument.
REDACTED = "<redacted>"


def _check_arg(name: str, value: bytes, *, allow_space: bool = True) -> bytes:
    if not value:
        raise LocalProtocolError(f"{name}: empty argument")
    for bad in _FORBIDDEN:
        if bad in value:
            raise LocalProtocolError(f"{name}: argument contains a CR, LF or NUL byte")
    if not allow_space and b" " in value:
        raise LocalProtocolError(f"{name}: argument contains a space")
    return value


def _check_msg(name: str, msg: int) -> bytes:
    if not isinstance(msg, int) or isinstance(msg, bool) or msg < 1:
        raise LocalProtocolError(f"{name}: message number must be a positive integer")
    return str(msg).encode("ascii")


@dataclass(frozen=True, slots=True)
class Command:
    """Base of every POP3 command; subclasses set :attr:`name`."""

    name: ClassVar[str] = ""
    #: May be sent while earlier commands still await their replies.
    pipelinable: ClassVar[bool] = False
    #: How many leading arguments a log may show; None: all of them.  The
    #: rest carry a secret (a password, a digest, a SASL response).
    public_args: ClassVar[int | None] = None

    def args(self) -> tuple[bytes, ...]:
        return ()

    def trace(self) -> str:
        """The command line as a log may show it: secret arguments replaced by
        :data:`REDACTED`, anything unprintable escaped.  Never raises for a
        bad argument (the log line is written before the bytes are built)."""
        try:
            args = self.args()
        except LocalProtocolError:
            return f"{self.name} <invalid argument>"
        shown = args if self.public_args is None else args[: self.public_args]
        words = [self.name, *(escape_server_text(a) for a in shown)]
        if len(shown) < len(args):
            words.append(REDACTED)
        return " ".join(words)

    def multiline(self) -> bool:
        """Whether a positive reply is followed by a multi-line body."""
        return False

    def to_bytes(self) -> bytes:
        line = b" ".join((self.name.encode("ascii"), *self.args())) + b"\r\n"
        if len(line) > MAX_COMMAND_LINE:
            raise LocalProtocolError(
                f"{self.name}: command line of {len(line)} octets exceeds the "
                f"{MAX_COMMAND_LINE}-octet limit (RFC 2449 §4)"
            )
        return line


@dataclass(frozen=True, slots=True)
class User(Command):
    name: ClassVar[str] = "USER"
    user: str

    def args(self) -> tuple[bytes, ...]:
        return (_check_arg("USER", self.user.encode("utf-8")),)


@dataclass(frozen=True, slots=True)
class Pass(Command):
    """PASS; RFC 1939 §7 allows spaces in the password (the rest of the line)."""

    name: ClassVar[str] = "PASS"
    public_args: ClassVar[int | None] = 0
    password: str = field(repr=False)

    def args(self) -> tuple[bytes, ...]:
        return (_check_arg("PASS", self.password.encode("utf-8")),)


@dataclass(frozen=True, slots=True)
class Apop(Command):
    name: ClassVar[str] = "APOP"
    public_args: ClassVar[int | None] = 1
    user: str
    digest: str = field(repr=False)

    def args(self) -> tuple[bytes, ...]:
        user = _check_arg("APOP", self.user.encode("utf-8"), allow_space=False)
        return (user, _check_arg("APOP", self.digest.encode("ascii"), allow_space=False))


@dataclass(frozen=True, slots=True)
class Stat(Command):
    name: ClassVar[str] = "STAT"
    pipelinable: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class List(Command):
    """LIST (multi-line scan listing) or LIST n (one scan line)."""

    name: ClassVar[str] = "LIST"
    pipelinable: ClassVar[bool] = True
    msg: int | None = None

    def args(self) -> tuple[bytes, ...]:
        return () if self.msg is None else (_check_msg("LIST", self.msg),)

    def multiline(self) -> bool:
        return self.msg is None


@dataclass(frozen=True, slots=True)
class Uidl(Command):
    """UIDL (multi-line unique-id listing) or UIDL n (RFC 1939 §7)."""

    name: ClassVar[str] = "UIDL"
    pipelinable: ClassVar[bool] = True
    msg: int | None = None

    def args(self) -> tuple[bytes, ...]:
        return () if self.msg is None else (_check_msg("UIDL", self.msg),)

    def multiline(self) -> bool:
        return self.msg is None


@dataclass(frozen=True, slots=True)
class Retr(Command):
    """RETR n.  ``limit`` caps the body (after unstuffing) in bytes; a longer
    body is a protocol violation (docs/design.md §4), so a server cannot fill the disk."""

    name: ClassVar[str] = "RETR"
    pipelinable: ClassVar[bool] = True
    msg: int
    limit: int | None = None

    def args(self) -> tuple[bytes, ...]:
        return (_check_msg("RETR", self.msg),)

    def multiline(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Top(Command):
    """TOP n k: the headers and the first k body lines (RFC 1939 §7)."""

    name: ClassVar[str] = "TOP"
    pipelinable: ClassVar[bool] = True
    msg: int
    lines: int
    limit: int | None = None

    def args(self) -> tuple[bytes, ...]:
        if not isinstance(self.lines, int) or self.lines < 0:
            raise LocalProtocolError("TOP: line count must be a non-negative integer")
        return (_check_msg("TOP", self.msg), str(self.lines).encode("ascii"))

    def multiline(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Dele(Command):
    name: ClassVar[str] = "DELE"
    pipelinable: ClassVar[bool] = True
    msg: int

    def args(self) -> tuple[bytes, ...]:
        return (_check_msg("DELE", self.msg),)


@dataclass(frozen=True, slots=True)
class Noop(Command):
    name: ClassVar[str] = "NOOP"
    pipelinable: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class Rset(Command):
    name: ClassVar[str] = "RSET"
    pipelinable: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class Quit(Command):
    name: ClassVar[str] = "QUIT"


@dataclass(frozen=True, slots=True)
class Utf8(Command):
    """UTF8 (RFC 6856 §2): ask for messages as stored, 8-bit headers included.

    Sent before authentication when CAPA lists UTF8.  Without it Courier
    serves a message with raw UTF-8 in its headers as a generated wrapper
    whose MIME boundary changes on every download.
    """

    name: ClassVar[str] = "UTF8"


@dataclass(frozen=True, slots=True)
class Capa(Command):
    """CAPA (RFC 2449 §5); its reply is a multi-line capability list."""

    name: ClassVar[str] = "CAPA"

    def multiline(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Stls(Command):
    """STLS (RFC 2595 §4): only in AUTHORIZATION; TLS starts after the +OK CRLF."""

    name: ClassVar[str] = "STLS"


def encode_sasl(data: bytes) -> bytes:
    """Base64 for a SASL exchange; an empty response is ``=`` (RFC 5034 §4)."""
    return base64.b64encode(data) if data else b"="


@dataclass(frozen=True, slots=True)
class Auth(Command):
    """AUTH mechanism [initial-response] (RFC 5034 §4).

    ``initial`` is the raw (not yet base64) initial response.  RFC 5034 §4
    keeps AUTH within the 255-octet line limit: a caller whose initial
    response would not fit sends ``initial=None`` and answers the first
    challenge with :class:`AuthResponse` instead (:meth:`fits` tells).
    """

    name: ClassVar[str] = "AUTH"
    public_args: ClassVar[int | None] = 1  # the mechanism; never the initial response
    mechanism: str
    initial: bytes | None = field(default=None, repr=False)

    def args(self) -> tuple[bytes, ...]:
        mech = _check_arg("AUTH", self.mechanism.encode("ascii"), allow_space=False)
        if self.initial is None:
            return (mech,)
        return (mech, encode_sasl(self.initial))

    def fits(self) -> bool:
        try:
            self.to_bytes()
        except LocalProtocolError:
            return False
        return True


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """A client line inside an AUTH exchange: base64 data, or ``*`` to cancel.

    Not a command: it answers a ``+`` challenge of the AUTH in flight, and
    RFC 5034 §4 does not subject it to the 255-octet command limit.
    """

    data: bytes | None = field(repr=False)  # None cancels the exchange

    def trace(self) -> str:
        """Never the response itself: it is the secret, or derived from it."""
        return "*" if self.data is None else "<redacted SASL response>"

    def to_bytes(self) -> bytes:
        if self.data is None:
            return b"*\r\n"
        # Only an empty *initial* response is "=" (RFC 5034 §4); an empty
        # answer to a challenge is an empty line (SCRAM's last step is one).
        return base64.b64encode(self.data) + b"\r\n"
