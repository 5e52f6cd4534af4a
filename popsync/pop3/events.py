"""What the server said, as frozen values compared by value.

A reply to one command is a short sequence of events:

* single-line:       ``Ok`` or ``Err``
* multi-line list:   ``Ok``, then one ``Listing``: ``CapaListing``, ``ScanListing``
                     (LIST) or ``UidListing`` (UIDL) -- or ``Err``
* message body:      ``Ok``, any number of ``BodyData``, then ``EndOfBody`` (RETR, TOP)
* SASL exchange:     ``Challenge`` ... then ``Ok`` or ``Err`` (AUTH)

so a test reads ``assert events == [Ok(cmd, b"..."), BodyData(cmd, b"..."), EndOfBody(cmd, 5)]``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from popsync.errors import RespCode
from popsync.pop3.commands import Auth, Command

__all__ = [
    "NEED_DATA",
    "BodyData",
    "CapaListing",
    "Challenge",
    "ConnectionClosed",
    "EndOfBody",
    "Err",
    "Event",
    "Greeting",
    "Listing",
    "NeedData",
    "Ok",
    "ScanListing",
    "UidListing",
    "parse_resp_code",
]


class NeedData(enum.Enum):
    """Returned by ``next_event`` when more bytes must arrive first."""

    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's ``+OK`` banner; ``text`` may hold an APOP timestamp."""

    text: bytes


@dataclass(frozen=True, slots=True)
class Ok:
    command: Command
    text: bytes


@dataclass(frozen=True, slots=True)
class Err:
    """``-ERR``; ``command`` is None when the greeting itself was ``-ERR``."""

    command: Command | None
    text: bytes
    code: RespCode | None


@dataclass(frozen=True, slots=True)
class Challenge:
    """A ``+ base64`` continuation during AUTH (RFC 5034 §4); ``data`` is the raw base64."""

    command: Auth
    data: bytes


@dataclass(frozen=True, slots=True)
class Listing:
    """A multi-line listing is complete; one of the three kinds below.

    The core checks a listing line by line as it streams and hands out only
    the parsed result (see :mod:`popsync.pop3.listing` for the bounds).
    """

    command: Command


@dataclass(frozen=True, slots=True)
class CapaListing(Listing):
    """The dot-unstuffed lines of a CAPA reply, without line ends."""

    lines: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class UidListing(Listing):
    """The ``(n, uid)`` entries of a UIDL reply, in server order; the list is the caller's."""

    entries: list[tuple[int, bytes]]


@dataclass(frozen=True, slots=True)
class ScanListing(Listing):
    """The ``(n, size)`` entries of a LIST reply, in server order; the list is the caller's."""

    entries: list[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class BodyData:
    """A piece of a RETR / TOP body: dot-unstuffed, line ends as LF (Maildir's convention)."""

    command: Command
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfBody:
    """The body is complete.  ``octets`` counts it as RFC 1939 §11 does (CRLF as
    two octets, stuffing dots not counted), comparable with the LIST size."""

    command: Command
    octets: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The server closed the connection at a point where that is allowed."""


Event = Greeting | Ok | Err | Challenge | Listing | BodyData | EndOfBody | ConnectionClosed

_CODE_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-/")


def parse_resp_code(text: bytes) -> RespCode | None:
    """The RFC 2449 §6.4 response code at the start of *text*, e.g. ``[SYS/TEMP]``.

    Codes are compared case-insensitively and returned upper-case; anything
    that does not look like a code yields None (the text is still shown).
    """
    if not text.startswith(b"["):
        return None
    end = text.find(b"]", 1, 66)
    if end < 2:
        return None
    inner = text[1:end]
    if not set(inner) <= _CODE_CHARS:
        return None
    parts = tuple(p.decode("ascii").upper() for p in inner.split(b"/"))
    if any(not p for p in parts):
        return None
    return RespCode(parts)
