"""The mail store behind the test POP3 server, and the wire form of a message.

Contract:

* :class:`MailStore` is shared by every session of one or more servers and is
  safe to use from any thread.  It keeps insertion order; that order is the
  order in which a session numbers the messages 1..n (RFC 1939 §4: numbers are
  assigned when the maildrop is opened and are valid for that session only).
* Duplicate UIDs are allowed: RFC 1939 §7 lets a server that computes UIDs as
  a hash give two identical copies the same unique-id.  Deleting *one* copy
  therefore works by object identity (:meth:`MailStore.discard`), never by
  UID.
* The maildrop lock (RFC 1939 §4, "exclusive-access lock") lives here, so two
  servers sharing a store also share the lock.  A test may take it itself
  (:meth:`MailStore.try_lock`) to make a login fail with ``[IN-USE]``.
* A message is stored as the caller's bytes.  On the wire every line ending
  becomes CRLF (bare LF becomes CRLF, CRLF stays, a last line without an end
  gets one), lines starting with ``.`` are byte-stuffed, and ``.CRLF`` ends
  the response (RFC 1939 §3).  The size reported by LIST/STAT counts CRLF as
  two octets and does not count stuffed dots (RFC 1939 §11).  The wire form is
  built once per stored message and cached, so streaming thousands of
  messages costs one ``sendall`` of ready bytes each.  :func:`top_of` and
  :func:`with_unstuffed_dot` cut or damage that wire form for TOP and for
  the gh-95252 fault.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

__all__ = ["MailStore", "StoredMessage", "to_crlf", "to_wire", "top_of", "with_unstuffed_dot"]

TERMINATOR = b".\r\n"


def to_crlf(data: bytes) -> bytes:
    """Turn every line ending of *data* into CRLF; a final unterminated line gets one.

    Bare CR bytes that are not followed by LF are kept as they are.
    """
    # Two C-speed passes: CRLF -> LF folds existing pairs, LF -> CRLF restores
    # them and upgrades bare LFs.  A CR that is not directly before an LF is
    # never touched by either pass.
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if out and not out.endswith(b"\n"):
        out += b"\r\n"
    return out


def to_wire(data: bytes) -> tuple[bytes, int]:
    """Return ``(wire, size)``: the dot-stuffed CRLF body ending in ``.CRLF``, and its size.

    *size* is the RFC 1939 §11 size: the CRLF form without stuffing or terminator.
    """
    crlf = to_crlf(data)
    stuffed = crlf.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + TERMINATOR, len(crlf)


@dataclass(frozen=True)
class StoredMessage:
    """One message in a :class:`MailStore`: its UID and its bytes as stored.

    Compared by value; the store removes a particular copy by identity.
    """

    uid: bytes
    data: bytes

    @cached_property
    def _wire_and_size(self) -> tuple[bytes, int]:
        return to_wire(self.data)

    @property
    def wire(self) -> bytes:
        """The dot-stuffed CRLF form followed by ``.CRLF`` (built once, then cached)."""
        return self._wire_and_size[0]

    @property
    def size(self) -> int:
        """Size in octets as LIST reports it (RFC 1939 §11)."""
        return self._wire_and_size[1]


def top_of(wire: bytes, lines: int) -> bytes:
    """The TOP response body: header, blank line, first *lines* body lines, terminator.

    Works on the stuffed wire form: stuffing never touches the empty line that
    ends the header (RFC 5322 §2.1), so both can be cut from it directly.
    """
    text = wire[:-3]
    if text.startswith(b"\r\n"):
        cut = 2
    else:
        end = text.find(b"\r\n\r\n")
        if end < 0:
            return wire
        cut = end + 4
    for _ in range(lines):
        nxt = text.find(b"\r\n", cut)
        if nxt < 0:
            cut = len(text)
            break
        cut = nxt + 2
    return text[:cut] + b".\r\n"


def with_unstuffed_dot(message: StoredMessage) -> bytes:
    """The wire form of *message* with a lone, unstuffed ``.`` line in its body."""
    text = message.wire[:-3]
    head = text.find(b"\r\n\r\n")
    start = head + 4 if head >= 0 else 0
    cut = text.find(b"\r\n", start + (len(text) - start) // 2)
    at = cut + 2 if cut >= 0 else len(text)
    return text[:at] + b".\r\n" + text[at:] + b".\r\n"


def _check_uid(uid: bytes) -> None:
    # UIDs are left loose on purpose (tests feed clients odd ones, RFC 1939 §7
    # says 0x21-0x7E), but CR and LF would break the server's own framing.
    if not uid or b"\r" in uid or b"\n" in uid:
        raise ValueError(f"a UID must be non-empty and free of CR/LF: {uid!r}")


class MailStore:
    """A thread-safe, ordered collection of messages shared by server sessions."""

    def __init__(self, messages: Iterable[bytes] = ()) -> None:
        """Create a store holding *messages* (UIDs generated)."""
        self._lock = threading.Lock()
        self._messages: list[StoredMessage] = []
        self._seq = 0
        self._holder: object | None = None
        # Sessions logged in to this maildrop now, locked or not.
        self._inside: set[int] = set()
        self.add_many(messages)

    def _new_uid(self, data: bytes) -> bytes:
        self._seq += 1
        digest = hashlib.sha256(data).hexdigest()[:16]
        return b"m%06d.%s" % (self._seq, digest.encode("ascii"))

    def add(self, data: bytes, uid: bytes | None = None) -> bytes:
        """Append a message and return its UID (generated, unique, when *uid* is None).

        Raises ValueError if *uid* is empty or contains CR or LF.
        """
        if uid is not None:
            _check_uid(uid)
        with self._lock:
            chosen = uid if uid is not None else self._new_uid(data)
            self._messages.append(StoredMessage(chosen, bytes(data)))
        return chosen

    def add_many(self, messages: Iterable[bytes]) -> list[bytes]:
        """Append each message with a generated UID; return the UIDs in order."""
        return [self.add(data) for data in messages]

    def remove(self, uid: bytes) -> int:
        """Remove every message whose UID is *uid*; return how many were removed."""
        with self._lock:
            before = len(self._messages)
            self._messages = [m for m in self._messages if m.uid != uid]
            return before - len(self._messages)

    def discard(self, messages: Iterable[StoredMessage]) -> list[StoredMessage]:
        """Remove these exact objects (by identity) if still present; return those removed.

        This is how a session's UPDATE state removes one of several identical
        copies without touching the others.
        """
        wanted = {id(m) for m in messages}
        with self._lock:
            removed = [m for m in self._messages if id(m) in wanted]
            self._messages = [m for m in self._messages if id(m) not in wanted]
        return removed

    def rewrite(self, message: StoredMessage, data: bytes) -> None:
        """Replace this exact copy (by identity) with *data*, keeping its UID and place."""
        with self._lock:
            for i, held in enumerate(self._messages):
                if held is message:
                    self._messages[i] = StoredMessage(message.uid, bytes(data))

    def messages(self) -> list[StoredMessage]:
        """A snapshot (copy) of the messages in order."""
        with self._lock:
            return list(self._messages)

    def uids(self) -> list[bytes]:
        """The UIDs in order (duplicates included)."""
        with self._lock:
            return [m.uid for m in self._messages]

    def clear(self) -> None:
        """Remove every message (the maildrop lock is left as it is)."""
        with self._lock:
            self._messages = []

    def __len__(self) -> int:
        with self._lock:
            return len(self._messages)

    # -- the maildrop lock (RFC 1939 §4) ------------------------------------

    def try_lock(self, owner: object) -> bool:
        """Take the maildrop lock for *owner*; False if someone else holds it.

        Re-taking a lock one already holds succeeds.
        """
        with self._lock:
            if self._holder is None or self._holder is owner:
                self._holder = owner
                return True
            return False

    def unlock(self, owner: object) -> None:
        """Release the lock if *owner* holds it; otherwise do nothing."""
        with self._lock:
            if self._holder is owner:
                self._holder = None

    def enter(self, owner: object) -> int:
        """Count *owner* as logged in; returns how many others were logged in already.

        Independent of the lock: it is how a test sees two sessions of one
        maildrop overlap, even when the server does not lock.
        """
        with self._lock:
            others = len(self._inside - {id(owner)})
            self._inside.add(id(owner))
            return others

    def leave(self, owner: object) -> None:
        """*owner* is no longer logged in (idempotent)."""
        with self._lock:
            self._inside.discard(id(owner))

    @property
    def locked(self) -> bool:
        """Whether some session (or test) holds the maildrop lock."""
        with self._lock:
            return self._holder is not None
