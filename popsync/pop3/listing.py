"""Pure parsers for what listings and single-line replies carry.

* ``UIDL``: ``n uid`` lines (RFC 1939 §7).  The unique-id is 1-70 octets of
  0x21-0x7E.  We are lenient on the length (Fastmail once served longer ids)
  but never on the octets: an id with a space, control or 8-bit byte is a
  protocol violation.  Ids never reach a path anyway (Maildir names are
  hashes), but an out-of-range byte means we are misreading the stream.
* ``LIST``: ``n size`` lines (RFC 1939 §5), sizes in decimal octets.
* Message numbers must be positive and unique within one listing; a server
  that repeats a number is out of its mind, and we stop rather than guess.
* ``CAPA`` lines (RFC 2449 §5) become a :class:`Capabilities` value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from popsync.errors import RemoteProtocolError

_V = TypeVar("_V")

#: Longest UID accepted (RFC 1939 §7 says 70; be lenient, but bounded).
MAX_UID_LENGTH = 512
_UID_RE = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_UID_LENGTH)
_NUMBER_RE = re.compile(rb"[0-9]{1,19}")


def _number(token: bytes, what: str) -> int:
    if _NUMBER_RE.fullmatch(token) is None:
        raise RemoteProtocolError(f"{what}: not a decimal number")
    return int(token)


def _msg_number(token: bytes, what: str) -> int:
    msg = _number(token, what)
    if msg < 1:
        raise RemoteProtocolError(f"{what}: message number 0")
    return msg


def parse_uidl_line(line: bytes) -> tuple[int, bytes]:
    """``n uid`` (a listing line, or the text of ``+OK n uid``)."""
    parts = line.split()
    if len(parts) != 2:
        raise RemoteProtocolError("UIDL: line is not 'number unique-id'")
    msg = _msg_number(parts[0], "UIDL")
    uid = parts[1]
    if _UID_RE.fullmatch(uid) is None:
        raise RemoteProtocolError(
            f"UIDL: unique-id must be 1-{MAX_UID_LENGTH} octets of 0x21-0x7E (RFC 1939 §7)"
        )
    return msg, uid


def parse_scan_line(line: bytes) -> tuple[int, int]:
    """``n size`` (a LIST line, or the text of ``+OK n size``).

    RFC 1939 §5 allows more after the size ("additional information"); it is ignored.
    """
    parts = line.split()
    if len(parts) < 2:
        raise RemoteProtocolError("LIST: line is not 'number size'")
    return _msg_number(parts[0], "LIST"), _number(parts[1], "LIST size")


def parse_stat(text: bytes) -> tuple[int, int]:
    """The text of ``+OK count size`` (RFC 1939 §5)."""
    parts = text.split()
    if len(parts) < 2:
        raise RemoteProtocolError("STAT: reply is not 'count size'")
    return _number(parts[0], "STAT count"), _number(parts[1], "STAT size")


def _unique(pairs: Sequence[tuple[int, object]], what: str) -> None:
    seen = {msg for msg, _ in pairs}
    if len(seen) != len(pairs):
        raise RemoteProtocolError(f"{what}: the same message number is listed twice")


# Whole-listing patterns in the canonical form (one space, nothing after):
# one C-level pass validates 50,000 lines; anything else takes the lenient
# per-line path, which also names what is wrong.
_UIDL_LISTING_RE = re.compile(rb"(?:[0-9]{1,19} [\x21-\x7e]{1,%d}\n)*" % MAX_UID_LENGTH)
_SCAN_LISTING_RE = re.compile(rb"(?:[0-9]{1,19} [0-9]{1,19}\n)*")


def _canonical(lines: Sequence[bytes], pattern: re.Pattern[bytes]) -> bool:
    return pattern.fullmatch(b"\n".join(lines) + b"\n" if lines else b"") is not None


def _parse_listing(
    lines: Sequence[bytes],
    what: str,
    canonical: re.Pattern[bytes],
    value: Callable[[bytes], _V],
    lenient: Callable[[bytes], tuple[int, _V]],
) -> list[tuple[int, _V]]:
    """``(n, value)`` pairs: one regex pass when every line is canonical,
    else the lenient per-line parser (which names what is wrong)."""
    if _canonical(lines, canonical):
        pairs = [(int(n), value(rest)) for n, rest in (line.split(b" ") for line in lines)]
        if any(n == 0 for n, _ in pairs):
            raise RemoteProtocolError(f"{what}: message number 0")
    else:
        pairs = [lenient(line) for line in lines]
    _unique(pairs, what)
    return pairs


def parse_uidl_listing(lines: Sequence[bytes]) -> list[tuple[int, bytes]]:
    """All ``(n, uid)`` pairs of a UIDL listing, in server order."""
    return _parse_listing(lines, "UIDL", _UIDL_LISTING_RE, bytes, parse_uidl_line)


def parse_scan_listing(lines: Sequence[bytes]) -> list[tuple[int, int]]:
    """All ``(n, size)`` pairs of a LIST listing, in server order."""
    return _parse_listing(lines, "LIST", _SCAN_LISTING_RE, int, parse_scan_line)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What CAPA said (RFC 2449 §6).  ``names`` holds every tag upper-cased."""

    names: frozenset[str] = frozenset()
    sasl: frozenset[str] = frozenset()
    login_delay: int | None = None
    #: ``"NEVER"``, or the minimum number of days as a decimal string.
    expire: str | None = None
    implementation: str | None = None

    def has(self, name: str) -> bool:
        return name.upper() in self.names

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.names

    @property
    def expire_zero(self) -> bool:
        """RFC 2449 §6.7: mail may not be left on the server; RETR may imply DELE."""
        return self.expire == "0"


def parse_capabilities(lines: Iterable[bytes]) -> Capabilities:
    """Parse CAPA lines; unknown tags are kept, malformed arguments ignored."""
    names: set[str] = set()
    sasl: set[str] = set()
    login_delay: int | None = None
    expire: str | None = None
    implementation: str | None = None
    for raw in lines:
        text = raw.decode("ascii", "replace")
        words = text.split()
        if not words:
            continue
        tag = words[0].upper()
        names.add(tag)
        args = words[1:]
        if tag == "SASL":
            sasl.update(w.upper() for w in args)
        elif tag == "LOGIN-DELAY" and args and args[0].isdigit():
            login_delay = int(args[0])
        elif tag == "EXPIRE" and args and (args[0].isdigit() or args[0].upper() == "NEVER"):
            expire = args[0].upper()
        elif tag == "IMPLEMENTATION":
            implementation = " ".join(args)[:100]
    return Capabilities(frozenset(names), frozenset(sasl), login_delay, expire, implementation)
