"""Pure parsers for what listings and single-line replies carry, with their bounds.

* ``UIDL``: ``n uid`` lines (RFC 1939 §7).  The unique-id is 1-70 octets of
  0x21-0x7E.  We are lenient on the length (Fastmail once served longer ids)
  but never on the octets: an id with a space, control or 8-bit byte is a
  protocol violation.  Ids never reach a path anyway (Maildir names are
  hashes), but an out-of-range byte means we are misreading the stream.
* ``LIST``: ``n size`` lines (RFC 1939 §5), sizes in decimal octets.
* Message numbers must be positive and unique within one listing; a server
  that repeats a number is out of its mind, and we stop rather than guess.
* ``CAPA`` lines (RFC 2449 §5) become a :class:`Capabilities` value.

Bounds -- everything here comes from the server, so every number is capped
before anything downstream sees it:

* A message number is at most :data:`MAX_MESSAGES`: a listing holds at most
  that many lines, so a larger number names a message we could never sync.
* A size is at most :data:`MAX_MESSAGE_SIZE` (2**40 octets, 1 TiB): far above
  any real message, and small enough that a whole listing's sizes add up to
  less than 2**60 (MAX_MESSAGES < 2**20), so no sum of sizes can overflow a
  signed 64-bit integer (SQLite's INTEGER) downstream.
* Each listing has its own :class:`ListingLimits` (:data:`LISTING_LIMITS`):
  the longest line, the most lines and the most octets.  The parsers below
  take the listing in pieces as it arrives (:meth:`ListingParser.feed`) and
  check every line at once, so a hostile listing fails after at most one
  receive chunk, never after it has been held whole.

A valid listing is stored compactly: each piece is parsed straight into the
final ``(n, value)`` list, with no list of lines in between.  In the common
canonical form (one space, nothing else) one regex pass validates a piece,
and ``bytes.split`` plus ``map(int, ...)`` build the entries in C.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import islice
from types import MappingProxyType
from typing import Generic, TypeVar

from popsync.errors import RemoteProtocolError

_V = TypeVar("_V", bytes, int)

#: Most messages (lines) one UIDL or LIST listing may hold; mpop's
#: POP3_MAX_MESSAGES is of this order.  Also the largest message number.
MAX_MESSAGES = 1_000_000
#: Largest message size believed, in octets (see the module docstring).
MAX_MESSAGE_SIZE = 1 << 40
#: Longest UID accepted (RFC 1939 §7 says 70; be lenient, but bounded).
MAX_UID_LENGTH = 512
_UID_RE = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_UID_LENGTH)
_NUMBER_RE = re.compile(rb"[0-9]{1,19}")


@dataclass(frozen=True, slots=True)
class ListingLimits:
    """Bounds on one multi-line listing, each checked as the listing streams in.

    ``line``: most octets in one line, its CRLF included; ``lines``: most
    lines; ``octets``: most octets in all (the terminating ``.`` line aside).
    """

    line: int
    lines: int
    octets: int


#: ``MAX_MESSAGES SP 512-octet-uid CRLF``: the longest valid UIDL line.
UIDL_MAX_LINE = len(b"%d " % MAX_MESSAGES) + MAX_UID_LENGTH + 2

#: The bounds of each listing, by command name.
LISTING_LIMITS: Mapping[str, ListingLimits] = MappingProxyType(
    {
        # RFC 2449 §5: a capability line is at most 512 octets; allow twice
        # that.  A real CAPA is under 2 KiB, and it is read before login and
        # before STLS, where a man in the middle can write it: keep it small.
        "CAPA": ListingLimits(line=1024, lines=200, octets=64 * 1024),
        # A valid listing of MAX_MESSAGES longest lines must pass (~500 MiB).
        "UIDL": ListingLimits(
            line=UIDL_MAX_LINE, lines=MAX_MESSAGES, octets=MAX_MESSAGES * UIDL_MAX_LINE
        ),
        # ``n SP size CRLF`` needs at most 23 octets; RFC 1939 §5 lets
        # "additional information" follow the size, so allow some.
        "LIST": ListingLimits(line=128, lines=MAX_MESSAGES, octets=32 * 1024 * 1024),
    }
)


def _number(token: bytes, what: str) -> int:
    if _NUMBER_RE.fullmatch(token) is None:
        raise RemoteProtocolError(f"{what}: not a decimal number")
    return int(token)


def _msg_number(token: bytes, what: str) -> int:
    msg = _number(token, what)
    if msg < 1:
        raise RemoteProtocolError(f"{what}: message number 0")
    if msg > MAX_MESSAGES:
        raise RemoteProtocolError(f"{what}: message number above {MAX_MESSAGES}")
    return msg


def _size(token: bytes, what: str) -> int:
    size = _number(token, what)
    if size > MAX_MESSAGE_SIZE:
        raise RemoteProtocolError(
            f"{what}: {size} octets cannot be a message (more than {MAX_MESSAGE_SIZE})"
        )
    return size


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
    return _msg_number(parts[0], "LIST"), _size(parts[1], "LIST size")


class ListingParser:
    """Takes one listing piece by piece and enforces its :class:`ListingLimits`.

    :meth:`feed` gets complete lines as they came off the wire (CRLF or LF
    ends, dot-stuffing still in place, the terminating line removed);
    :meth:`check_unfinished` gets the length of the line still arriving.
    Both raise :class:`RemoteProtocolError` naming the command.
    """

    __slots__ = ("limits", "lines", "octets", "what")

    def __init__(self, what: str, limits: ListingLimits) -> None:
        self.what = what
        self.limits = limits
        self.lines = 0
        self.octets = 0

    def feed(self, raw: bytes) -> None:
        raise NotImplementedError

    def check_unfinished(self, length: int) -> None:
        """Raise if a line of which *length* octets arrived, its end not yet, is too long."""
        if length >= self.limits.line:
            self._too_long()

    def _too_long(self) -> None:
        raise RemoteProtocolError(
            f"{self.what}: server sent a listing line longer than {self.limits.line} octets"
        )

    def _account(self, raw: bytes) -> None:
        """Count *raw* against the line and octet totals, before it is parsed.

        Past a total, an overlong line in *raw* is named first: which fault
        shows must not depend on how the reads happened to cut the stream.
        """
        self.lines += raw.count(b"\n")
        self.octets += len(raw)
        limits = self.limits
        if self.lines <= limits.lines and self.octets <= limits.octets:
            return
        if max(map(len, raw.split(b"\n"))) >= limits.line:  # + the LF
            self._too_long()
        if self.lines > limits.lines:
            raise RemoteProtocolError(f"{self.what}: listing has more than {limits.lines} lines")
        raise RemoteProtocolError(f"{self.what}: listing is longer than {limits.octets} octets")

    def _split(self, raw: bytes) -> list[bytes]:
        """The lines of *raw*: each checked for length, line end and stuffing removed."""
        lines = raw.split(b"\n")
        lines.pop()  # raw ends with LF: the last piece is empty
        if lines and max(map(len, lines)) >= self.limits.line:  # + the LF
            self._too_long()
        if b"\r" in raw:
            lines = [line.removesuffix(b"\r") for line in lines]
        # RFC 1939 §3: one dot was added to every line that starts with one.
        if raw.startswith(b".") or b"\n." in raw:
            lines = [line[1:] if line.startswith(b".") else line for line in lines]
        return lines


class CapaParser(ListingParser):
    """The lines of a CAPA listing (RFC 2449 §5), kept as bytes."""

    __slots__ = ("result",)

    def __init__(self, limits: ListingLimits = LISTING_LIMITS["CAPA"]) -> None:
        super().__init__("CAPA", limits)
        self.result: list[bytes] = []

    def feed(self, raw: bytes) -> None:
        self._account(raw)
        self.result += self._split(raw)


def _ascending(nums: list[int], after: int) -> bool:
    """Whether *nums* rise strictly, all above *after* (C-level, no per-item bytecode)."""
    return nums[0] > after and all(map(operator.lt, nums, islice(nums, 1, None)))


class _EntriesParser(ListingParser, Generic[_V]):
    """Streams a UIDL or LIST listing into its final ``(n, value)`` list.

    Numbers are checked for uniqueness cheaply while they ascend (every real
    server lists in order); the first piece out of order switches to a set.
    """

    __slots__ = ("_last", "_seen", "result")

    def __init__(self, what: str, limits: ListingLimits) -> None:
        super().__init__(what, limits)
        self.result: list[tuple[int, _V]] = []
        self._last = 0  # highest number so far, while they ascend
        self._seen: set[int] | None = None  # every number, once they did not

    def feed(self, raw: bytes) -> None:
        self._account(raw)
        parsed = self._canonical(raw)
        if parsed is None:
            pairs = [self._line(line) for line in self._split(raw)]
            parsed = [n for n, _ in pairs], [v for _, v in pairs]
        nums, values = parsed
        if not nums:
            return
        self._check_numbers(nums)
        self.result += zip(nums, values, strict=True)

    def _canonical(self, raw: bytes) -> tuple[list[int], list[_V]] | None:
        """Numbers and values if every line of *raw* is canonical, else None."""
        raise NotImplementedError

    def _line(self, line: bytes) -> tuple[int, _V]:
        """The lenient parser of one line; names what is wrong."""
        raise NotImplementedError

    def _check_numbers(self, nums: list[int]) -> None:
        if min(nums) < 1:
            raise RemoteProtocolError(f"{self.what}: message number 0")
        if max(nums) > MAX_MESSAGES:
            raise RemoteProtocolError(f"{self.what}: message number above {MAX_MESSAGES}")
        if self._seen is None:
            if _ascending(nums, self._last):
                self._last = nums[-1]
                return
            self._seen = {n for n, _ in self.result}
        before = len(self._seen)
        self._seen.update(nums)
        if len(self._seen) != before + len(nums):
            raise RemoteProtocolError(f"{self.what}: the same message number is listed twice")


# One piece of a listing in the canonical form (one space, nothing after,
# CRLF or LF).  The bounded repetitions also bound every line's length.
_UIDL_PIECE_RE = re.compile(rb"(?:[0-9]{1,7} [\x21-\x7e]{1,%d}\r?\n)*" % MAX_UID_LENGTH)
_SCAN_PIECE_RE = re.compile(rb"(?:[0-9]{1,7} [0-9]{1,13}\r?\n)*")


class UidlParser(_EntriesParser[bytes]):
    """``(n, uid)`` entries of a UIDL listing, in server order."""

    __slots__ = ()

    def __init__(self, limits: ListingLimits = LISTING_LIMITS["UIDL"]) -> None:
        super().__init__("UIDL", limits)

    def _canonical(self, raw: bytes) -> tuple[list[int], list[bytes]] | None:
        if _UIDL_PIECE_RE.fullmatch(raw) is None:
            return None
        tokens = raw.split()
        return list(map(int, islice(tokens, 0, None, 2))), tokens[1::2]

    def _line(self, line: bytes) -> tuple[int, bytes]:
        return parse_uidl_line(line)


class ScanParser(_EntriesParser[int]):
    """``(n, size)`` entries of a LIST listing, in server order."""

    __slots__ = ()

    def __init__(self, limits: ListingLimits = LISTING_LIMITS["LIST"]) -> None:
        super().__init__("LIST", limits)

    def _canonical(self, raw: bytes) -> tuple[list[int], list[int]] | None:
        if _SCAN_PIECE_RE.fullmatch(raw) is None:
            return None
        tokens = raw.split()
        sizes = list(map(int, islice(tokens, 1, None, 2)))
        if sizes and max(sizes) > MAX_MESSAGE_SIZE:
            return None  # the lenient parser names the culprit
        return list(map(int, islice(tokens, 0, None, 2))), sizes

    def _line(self, line: bytes) -> tuple[int, int]:
        return parse_scan_line(line)


def listing_parser(name: str, limits: Mapping[str, ListingLimits]) -> ListingParser:
    """The parser for the listing that answers command *name* (CAPA, UIDL or LIST)."""
    if name == "UIDL":
        return UidlParser(limits["UIDL"])
    if name == "LIST":
        return ScanParser(limits["LIST"])
    return CapaParser(limits[name])


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
