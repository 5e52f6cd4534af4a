"""Is the message the server lists now the one popsync stored earlier?

POP3 gives a client nothing but a unique-id and a size to recognise a
message by, and neither is a promise: RFC 1939 §7 only says a server
*should* not reuse a unique-id, and LIST sizes are not exact on every
server.  Before popsync DELEs mail it delivered in an earlier session it
therefore asks ``TOP n 0`` for the header section and compares, and before
it trusts a body at all it compares the octets received with the LIST size.
Everything here is pure: the caller does the I/O.

Two facts of real servers shape the rules:

* **mbox servers rewrite status fields.**  GNU Mailutils, and most servers
  that keep mail in mbox files, add or change ``Status``, ``X-UID``,
  ``X-IMAPbase``, ``X-UIDL`` and similar fields when a session ends, so a
  message's LIST size grows after popsync fetched it (287 -> 354 octets seen
  in practice).  The identity of a message is therefore its header section
  *without* those fields (:data:`MUTABLE_FIELDS`) and its size without their
  octets.
* **Some servers regenerate headers on every download** (Courier's RFC 6856
  wrapper for 8-bit headers, whose MIME boundary changes each time).  Headers
  that differ at an unchanged size therefore prove nothing either way: such a
  message is neither deleted nor fetched again.  Only headers *and* size that
  both differ show that the unique-id now names another message.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

#: Header fields that mbox servers (and mail readers) add or rewrite on a
#: message they already hold; lower-case, without the colon.
MUTABLE_FIELDS: frozenset[bytes] = frozenset(
    {
        b"status",
        b"x-status",
        b"x-keywords",
        b"x-uid",
        b"x-imap",
        b"x-imapbase",
        b"x-uidl",
        b"content-length",
        b"lines",
    }
)

#: Longest header section examined; a longer one gets no identity digest.
HEADER_CAP = 256 * 1024

#: A body may arrive this much shorter than its LIST size before it is
#: doubted: servers that keep mbox files may count a ``From`` line or status
#: fields they strip when sending.  Servers that count a line end as one
#: octet report *less* than what arrives, never more.
SHORT_SLACK_OCTETS = 1024
SHORT_SLACK_FRACTION = 20  # and 1/20 of the size


def is_short(received_octets: int, list_size: int | None) -> bool:
    """Did a body end far sooner than the server said it would (RFC 1939 §11)?

    *received_octets* counts the body as on the wire: a line end is two
    octets, stuffing dots are not counted.
    """
    if list_size is None:
        return False
    slack = max(SHORT_SLACK_OCTETS, list_size // SHORT_SLACK_FRACTION)
    return received_octets + slack < list_size


@dataclass(frozen=True, slots=True)
class HeaderDigest:
    """What the header section of one copy of a message says about it."""

    #: SHA-256 of the whole header section, blank line included.
    full: str
    #: SHA-256 of the header field lines that are not :data:`MUTABLE_FIELDS`
    #: (the blank line excluded, so a TOP reply without it still compares).
    stable: str
    #: LF-form octets and line count of the mutable fields' lines.
    mutable_octets: int
    mutable_lines: int


def digest_headers(section: bytes) -> HeaderDigest:
    """Digest a header section in LF form (up to and including the blank line)."""
    full = hashlib.sha256(section).hexdigest()
    body = section[:-1] if section.endswith(b"\n\n") else section
    stable = hashlib.sha256()
    mutable_octets = mutable_lines = 0
    for field in _fields(body):
        name = field.split(b":", 1)[0].strip().lower()
        if name in MUTABLE_FIELDS:
            mutable_octets += len(field)
            mutable_lines += field.count(b"\n")
        else:
            stable.update(field)
    return HeaderDigest(full, stable.hexdigest(), mutable_octets, mutable_lines)


def _fields(section: bytes) -> list[bytes]:
    """Split header lines into fields; a line starting with SP or TAB continues one."""
    fields: list[bytes] = []
    for line in section.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


class HeaderHasher:
    """Collects the header section of a body as it streams, then digests it.

    Keeps at most :data:`HEADER_CAP` bytes; a longer header section yields
    None from :meth:`digest`.
    """

    __slots__ = ("_buf", "_done", "_result")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._result: HeaderDigest | None = None
        self._done = False

    def feed(self, data: bytes) -> None:
        if self._done:
            return
        start = max(0, len(self._buf) - 1)
        self._buf += data
        end = self._buf.find(b"\n\n", start)
        if end >= 0:
            self._result = digest_headers(bytes(self._buf[: end + 2]))
            self._done = True
            self._buf = bytearray()
        elif len(self._buf) > HEADER_CAP:
            self._done = True
            self._buf = bytearray()

    def digest(self) -> HeaderDigest | None:
        """The digest; a message with no blank line is all header."""
        if not self._done:
            return digest_headers(bytes(self._buf))
        return self._result


class Verdict(enum.Enum):
    SAME = "same"  # confirmed: safe to DELE
    OTHER = "other"  # the unique-id now names a different message
    UNKNOWN = "unknown"  # cannot confirm: leave it alone


@dataclass(frozen=True, slots=True)
class Stored:
    """What popsync knows of the copy it holds: the ledger's record, or for
    a row written by an older popsync, the same measured from its file."""

    server_size: int  # LIST size when it was fetched
    wire_size: int | None  # octets received; None: unknown (file gone)
    stored_size: int
    stable_sha256: str
    mutable_octets: int
    mutable_lines: int


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    reason: str = ""


def complete_copy(stored: Stored) -> bool:
    """Does the stored copy hold the whole message the server announced?"""
    if stored.wire_size is None:
        return False
    if not is_short(stored.wire_size, stored.server_size):
        return True
    # A server that counts a line end as one octet reports the LF size.
    return stored.stored_size >= stored.server_size


def judge(stored: Stored, list_size: int, top: HeaderDigest | None) -> Judgement:
    """Is the message listed now with *list_size* (and ``TOP n 0`` digest *top*,
    None if the server refused TOP) the copy described by *stored*, and is
    that copy complete?  Only ``SAME`` allows a DELE.
    """
    if not complete_copy(stored):
        return Judgement(
            Verdict.UNKNOWN,
            "the stored copy cannot be shown to be complete"
            + (" (its file is gone or changed)" if stored.wire_size is None else ""),
        )
    if top is None:
        changed = (
            ""
            if list_size == stored.server_size
            else f"its size changed ({stored.server_size} -> {list_size} octets) and "
        )
        return Judgement(
            Verdict.UNKNOWN, f"{changed}the server refused TOP, so it cannot be compared"
        )
    size_same = _size_explained(stored, list_size, top)
    if top.stable == stored.stable_sha256:
        if size_same:
            return Judgement(Verdict.SAME)
        return Judgement(
            Verdict.UNKNOWN,
            f"its headers match but its size changed ({stored.server_size} -> {list_size} "
            "octets) beyond what rewritten status fields explain",
        )
    if size_same:
        return Judgement(
            Verdict.UNKNOWN,
            "its header section differs from the copy stored at delivery at the same size "
            "(the server may rewrite messages on download)",
        )
    return Judgement(Verdict.OTHER, "its headers and size both differ from the copy stored")


def _size_explained(stored: Stored, list_size: int, top: HeaderDigest) -> bool:
    """Is the size change entirely the mutable fields' doing?

    Tried both ways a server may count (CRLF as two octets, or as one).
    """
    octets = top.mutable_octets - stored.mutable_octets
    lines = top.mutable_lines - stored.mutable_lines
    return list_size - stored.server_size in (octets + lines, octets)
