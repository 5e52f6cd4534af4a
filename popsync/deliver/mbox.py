"""An mbox as a delivery target (:class:`popsync.deliver.base.Target`).

Messages are appended in the mboxrd format (:mod:`popsync.deliver.mboxrd`):
a ``From`` separator line naming the envelope sender (``Return-Path``) or
``MAILER-DAEMON``, the message with each ``^>*From`` line quoted by one more
``>``, and a blank line.  The stored form otherwise stays byte-exact, with
one exception the format forces: a message that does not end with a newline
gets one, or the blank line after it would not be a line of its own.

While a body streams in, its quoted form is spooled to an unnamed temporary
file (:class:`MboxDraft`), hashed as it goes; nothing touches the mbox until
the body is complete and trusted.

Exactly once, across crashes
----------------------------
The mbox is locked as Dovecot and mutt lock it (:mod:`popsync.deliver.mboxlock`)
from the first :meth:`MboxTarget.intent` of a batch until its
:meth:`MboxTarget.commit` returns.  Holding the lock across both is what
makes the intent exact: no other writer that locks can append in between, so
the offset noted is the offset written at.  The steps of one batch:

1. lock; for each message, the intent: the offset it will be written at,
   the padding and the separator line it will get (length and a
   fingerprint), the length and SHA-256 of the rest of its entry, and the
   size, SHA-256 and wire size of the stored form.  The ledger commits these
   before anything is written;
2. check the mbox still ends at the first offset noted (a program that
   writes without locking would make it differ: then nothing is written);
3. append every entry, fsync the mbox (and its directory if the mbox was
   just created), unlock.  A write error truncates back to the first offset.

Recovery (:meth:`MboxTarget.recover`), for each ``fetching`` row with an
intent, locks and looks at the offset noted:

* the entry is there, whole (fingerprint and SHA-256 agree): the message is
  recorded as delivered, not fetched again -- a crash after the fsync but
  before the ledger commit costs nothing;
* the file ends inside it -- from the offset noted to the end there is only
  its padding and its own separator line, no other entry: a crash cut the
  append short, and the file is truncated back to the offset (the message
  is still on the server: no DELE is sent before the ledger says delivered);
* anything else (nothing was written, or another program appended after a
  partial entry): not held; the message is fetched and appended again.  A
  partial entry followed by other mail is left in place, with a warning.

A mail reader that rewrites the mbox (expunging) between a crash and the
next poll can move a whole entry away from its noted offset: the rows not
found at their offsets are then looked for in one pass over the mbox, by
separator line and hash.  Only a copy the reader deleted meanwhile is
delivered a second time -- never lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from popsync import failpoints
from popsync.deliver import mboxlock
from popsync.deliver.base import Draft, Held, Pending, Receipt, Refusal
from popsync.deliver.mboxlock import MboxBusy, MboxLock
from popsync.deliver.mboxrd import Quoter, envelope_sender, from_line, padding, unquote
from popsync.deliver.spool import READ_CHUNK, SpoolDraft
from popsync.errors import DeliveryError
from popsync.identity import HEADER_CAP

#: Messages one lock, one append and one fsync may cover.
BATCH = 64

#: The crash points of a batch, in order (``POPSYNC_FAILPOINT``, see
#: :mod:`popsync.failpoints`; tests/test_crash.py kills a sync at each).
CRASH_POINTS = (
    "mbox_mid_append",  # half of the first message's body written
    "mbox_appended",  # the batch appended and fsynced, still locked
)

#: Bytes of a message's head searched for its ``Return-Path``.
_SENDER_HEAD = 64 * 1024
_INTENT_TAG = "mboxrd1"


class MboxDraft:
    """One message on its way into an mbox: its mboxrd-quoted body, spooled.

    ``size`` and ``sha256_hex`` describe the stored form (what was written);
    the spool holds the rest of the entry: the quoted body, then (after
    :meth:`finish`) a newline if the body lacked a last one, and the blank
    line that ends every entry.
    """

    def __init__(self, name: str) -> None:
        self._spool = SpoolDraft(name)
        self._quoter = Quoter()
        self._hash = hashlib.sha256()
        self._size = self._lines = 0
        self._last = b""
        self._body = hashlib.sha256()
        self._body_len = 0
        self._finished = False

    @property
    def name(self) -> str:
        return self._spool.name

    @property
    def size(self) -> int:
        return self._size

    @property
    def sha256_hex(self) -> str:
        return self._hash.hexdigest()

    @property
    def wire_size(self) -> int:
        """Octets as the server counted them (each LF was a CRLF)."""
        return self._size + self._lines

    def write(self, data: bytes) -> None:
        if self._finished:
            raise DeliveryError(f"message {self.name}: written after its end")
        if not data:
            return
        self._hash.update(data)
        self._size += len(data)
        self._lines += data.count(b"\n")
        self._last = data[-1:]
        self._put(self._quoter.feed(data))

    def finish(self) -> None:
        """The body is complete: close the entry.  Idempotent."""
        if self._finished:
            return
        self._put(self._quoter.flush())
        if self._size and self._last != b"\n":
            self._put(b"\n")
        self._put(b"\n")
        self._finished = True

    def _put(self, data: bytes) -> None:
        if data:
            self._spool.write(data)
            self._body.update(data)
            self._body_len += len(data)

    @property
    def body_len(self) -> int:
        return self._body_len

    @property
    def body_sha256(self) -> str:
        return self._body.hexdigest()

    def head(self, size: int) -> bytes:
        return self._spool.head(size)

    def chunks(self) -> Iterator[bytes]:
        return self._spool.chunks()

    def abort(self) -> None:
        self._spool.abort()


@dataclass(frozen=True, slots=True)
class Entry:
    """Where and what one message's mbox entry is: its intent, as noted."""

    #: Where writing starts: the end of the mbox when it was locked.
    offset: int
    #: Newlines first written so the separator follows a blank line.
    pad: int
    #: Length of the separator line, and the first 16 hex digits of its SHA-256.
    head: int
    head_sha: str
    #: Length and SHA-256 of the rest: quoted body, newline, blank line.
    body_len: int
    body_sha: str
    #: The stored form: size, SHA-256, wire size.
    size: int
    sha256: str
    wire_size: int

    @property
    def start(self) -> int:
        """Where the separator line starts."""
        return self.offset + self.pad

    @property
    def end(self) -> int:
        return self.start + self.head + self.body_len

    @property
    def receipt(self) -> str:
        return f"{self.start} {self.head + self.body_len}"

    def text(self) -> str:
        """The intent as the ledger notes it: a tag, then every field in order."""
        return " ".join((_INTENT_TAG, *map(str, dataclasses.astuple(self))))

    @classmethod
    def parse(cls, text: str | None) -> Entry | None:
        """The entry an intent names; None for another target's intent or none."""
        parts = (text or "").split()
        if len(parts) != 10 or parts[0] != _INTENT_TAG:
            return None
        try:
            o, p, h, hs, bl, bs, s, sha, w = parts[1:]
            return cls(int(o), int(p), int(h), hs, int(bl), bs, int(s), sha, int(w))
        except ValueError:
            return None


class MboxTarget:
    """One poll's deliveries into one mbox (see the module docstring)."""

    kind = "mbox"
    batch = BATCH
    exactly_once = True

    def __init__(self, path: Path, lock: MboxLock, warn: Callable[[str], None]) -> None:
        self.path = path
        self._lock = lock
        self._warn = warn
        self._fd: int | None = None
        #: Where the next entry goes, and the two bytes before it.
        self._end = 0
        self._tail = b""
        self._planned: list[tuple[MboxDraft, Entry, bytes]] = []
        #: Why this batch cannot be delivered now (the lock was not had).
        self._busy: str | None = None
        #: Drafts begun and not yet committed (discarded by :meth:`close`).
        self._drafts: set[MboxDraft] = set()

    def reserve(self, name: str) -> None:
        pass

    def begin(self, name: str, uid: bytes) -> MboxDraft:
        draft = MboxDraft(name)
        self._drafts.add(draft)
        return draft

    def end(self, draft: Draft) -> None:
        _mine(draft).finish()

    def intent(self, draft: Draft) -> str | None:
        """Lock the mbox (first message of a batch) and plan *draft*'s entry.

        Returns None when the lock could not be had: :meth:`commit` then
        refuses the batch for now.  Raises DeliveryError.
        """
        mine = _mine(draft)
        mine.finish()
        if self._busy is not None:
            return None
        if self._fd is None:
            try:
                self._lock_batch()
            except MboxBusy as exc:
                self._busy = str(exc)
                return None
        line = from_line(envelope_sender(mine.head(_SENDER_HEAD)), time.time())
        pad = padding(self._tail)
        entry = Entry(
            self._end,
            len(pad),
            len(line),
            _fingerprint(line),
            mine.body_len,
            mine.body_sha256,
            mine.size,
            mine.sha256_hex,
            mine.wire_size,
        )
        self._planned.append((mine, entry, pad + line))
        self._end, self._tail = entry.end, b"\n\n"
        return entry.text()

    def commit(self, drafts: Sequence[Draft]) -> list[Receipt | Refusal]:
        """Append the batch planned by :meth:`intent`, fsync, unlock.

        A lock another program held too long refuses every message for now
        (temporary).  Raises DeliveryError; then nothing of the batch is in
        the mbox.
        """
        try:
            if not self._planned and self._busy is None:
                for draft in drafts:
                    self.intent(draft)
            if self._busy is not None:
                return [Refusal(self._busy, temporary=True) for _ in drafts]
            if [d for d, _, _ in self._planned] != list(drafts):
                raise DeliveryError(f"mbox {self.path}: batch out of step with its intents")
            return self._append()
        finally:
            for draft in drafts:
                draft.abort()
                self._drafts.discard(_mine(draft))
            self._unlock()

    def recover(self, pending: Sequence[Pending]) -> list[Held]:
        """The pending messages whose entries are whole at their noted offsets
        (or, failing that, anywhere in the mbox); truncates a partial last
        entry (see the module docstring).

        Raises DeliveryError (MboxBusy when the lock could not be had).
        """
        entries = [(p, e) for p in pending if (e := Entry.parse(p.intent)) is not None]
        if not entries or not os.path.lexists(self.path):
            return []
        if self._fd is not None:
            raise DeliveryError(f"mbox {self.path}: recovery asked for during a batch")
        fd = self._lock.acquire()
        try:
            size = os.fstat(fd).st_size
            held = [self._held(fd, p, e) for p, e in entries if _holds(fd, e, size)]
            found = {h.asked for h in held}
            missing = [(p, e) for p, e in entries if p.name not in found]
            self._cut_partial(fd, [e for _, e in missing], size)
            if missing:  # a reader that rewrote the mbox may have moved them
                moved = _relocate(fd, missing, os.fstat(fd).st_size)
                held += [self._held(fd, p, e) for p, e in moved]
            return held
        except OSError as exc:
            raise DeliveryError(f"mbox {self.path}: cannot recover: {exc.strerror}") from None
        finally:
            self._lock.release()

    def close(self) -> None:
        for draft in self._drafts:
            draft.abort()
        self._drafts.clear()
        self._unlock()

    # -- a batch -----------------------------------------------------------------

    def _lock_batch(self) -> None:
        fd = self._lock.acquire()
        try:
            self._end = os.fstat(fd).st_size
            self._tail = os.pread(fd, 2, max(self._end - 2, 0))
        except OSError as exc:
            self._lock.release()
            raise DeliveryError(f"mbox {self.path}: cannot read: {exc.strerror}") from None
        self._fd = fd

    def _unlock(self) -> None:
        self._planned.clear()
        self._busy = None
        if self._fd is not None:
            self._fd = None
            self._lock.release()

    def _append(self) -> list[Receipt | Refusal]:
        fd = self._fd
        assert fd is not None and self._planned
        first = self._planned[0][1].offset
        try:
            if os.fstat(fd).st_size != first:
                raise DeliveryError(
                    f"mbox {self.path}: changed by a program that does not lock it; "
                    "nothing appended"
                )
            for draft, _, head in self._planned:
                _write_entry(fd, head, draft)
            os.fsync(fd)
            if self._lock.created:
                _fsync_directory(self.path.parent)
                self._lock.created = False
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, first)
            raise DeliveryError(f"mbox {self.path}: cannot append: {exc.strerror}") from None
        failpoints.failpoint("mbox_appended")
        return [Receipt(entry.receipt) for _, entry, _ in self._planned]

    # -- recovery ------------------------------------------------------------------

    def _held(self, fd: int, pending: Pending, entry: Entry) -> Held:
        raw = os.pread(fd, min(HEADER_CAP + 1, entry.body_len - 1), entry.start + entry.head)
        end = raw.find(b"\n\n")
        section = unquote(raw[: end + 2] if end >= 0 else raw)
        return Held(
            asked=pending.name,
            name=pending.name,
            size=entry.size,
            sha256=entry.sha256,
            wire_size=entry.wire_size,
            header_section=section,
            delivered_at=os.fstat(fd).st_mtime,
            receipt=entry.receipt,
        )

    def _cut_partial(self, fd: int, missing: list[Entry], size: int) -> None:
        """Truncate back an entry a crash cut short, if nothing came after it."""
        for entry in sorted((e for e in missing if e.offset < size), key=lambda e: -e.offset):
            tail = _tail(fd, entry, size)
            if tail is _Tail.PARTIAL:
                os.ftruncate(fd, entry.offset)
                os.fsync(fd)
                self._warn(
                    f"mbox {self.path}: removed {size - entry.offset} bytes of a delivery "
                    f"a crash interrupted (at offset {entry.offset}); it is fetched again"
                )
                return
            if tail is _Tail.FOLLOWED:
                self._warn(
                    f"mbox {self.path}: at offset {entry.offset} a delivery a crash interrupted "
                    "is followed by other mail; left as it is, the message is fetched again"
                )
                return


@contextmanager
def open_mbox_target(
    path: Path,
    *,
    warn: Callable[[str], None],
    lock_wait: float | None = None,
    stale_after: float | None = None,
) -> Iterator[MboxTarget]:
    """Open the mbox at *path* as a target for one poll (created, mode 0600,
    at the first delivery; its directory too, mode 0700).

    *lock_wait* and *stale_after* default to :data:`mboxlock.LOCK_WAIT` and
    :data:`mboxlock.STALE_AFTER`.  Raises DeliveryError when *path* is a
    directory or its directory cannot be created.
    """
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise DeliveryError(f"mbox {path}: cannot create its directory: {exc.strerror}") from None
    if path.is_dir():
        raise DeliveryError(f"mbox {path}: is a directory")
    lock = MboxLock(
        path,
        wait=mboxlock.LOCK_WAIT if lock_wait is None else lock_wait,
        stale_after=mboxlock.STALE_AFTER if stale_after is None else stale_after,
        warn=warn,
    )
    target = MboxTarget(path, lock, warn)
    try:
        yield target
    finally:
        target.close()


def _mine(draft: Draft) -> MboxDraft:
    if not isinstance(draft, MboxDraft):
        raise TypeError(f"not a draft of an mbox: {draft!r}")
    return draft


def _fingerprint(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()[:16]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_entry(fd: int, head: bytes, draft: MboxDraft) -> None:
    _write_all(fd, head)
    first = True
    for chunk in draft.chunks():
        if first:  # in two writes, so a crash test can stop half-way
            half = len(chunk) // 2
            _write_all(fd, chunk[:half])
            failpoints.failpoint("mbox_mid_append")
            chunk = chunk[half:]  # noqa: PLW2901
            first = False
        _write_all(fd, chunk)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_range(fd: int, start: int, length: int) -> str:
    digest = hashlib.sha256()
    while length > 0:
        chunk = os.pread(fd, min(length, READ_CHUNK), start)
        if not chunk:
            break
        digest.update(chunk)
        start += len(chunk)
        length -= len(chunk)
    return digest.hexdigest()


def _holds(fd: int, entry: Entry, size: int) -> bool:
    """Whether *entry* is whole at its noted offset."""
    if entry.end > size:
        return False
    line = os.pread(fd, entry.head, entry.start)
    return _fingerprint(line) == entry.head_sha and (
        _sha256_range(fd, entry.start + entry.head, entry.body_len) == entry.body_sha
    )


class _Tail(enum.Enum):
    """What the mbox holds from an entry's noted offset to its end."""

    #: Only a beginning of that entry: truncate it.
    PARTIAL = "partial"
    #: Its beginning, then another entry: leave it.
    FOLLOWED = "followed"
    #: Something else (another program's mail): nothing of ours was written.
    FOREIGN = "foreign"


def _tail(fd: int, entry: Entry, size: int) -> _Tail:
    """Whether the mbox, from *entry*'s offset to its end *size*, holds only a
    beginning of that entry: its padding, its separator line (or a piece of
    a separator line), and no other entry's separator."""
    pad = os.pread(fd, min(entry.pad, size - entry.offset), entry.offset)
    if pad.strip(b"\n"):
        return _Tail.FOREIGN
    rest = size - entry.start
    if rest <= 0:
        return _Tail.PARTIAL
    if rest < entry.head:
        piece = os.pread(fd, rest, entry.start)
        ours = b"\n" not in piece and piece[:5] == b"From "[: len(piece[:5])]
        return _Tail.PARTIAL if ours else _Tail.FOREIGN
    if _fingerprint(os.pread(fd, entry.head, entry.start)) != entry.head_sha:
        return _Tail.FOREIGN
    if _separator_after(fd, entry.start + entry.head, size):
        return _Tail.FOLLOWED
    return _Tail.PARTIAL


def _relocate(
    fd: int, missing: list[tuple[Pending, Entry]], size: int
) -> list[tuple[Pending, Entry]]:
    """The *missing* entries found whole elsewhere, each with its new offset.

    One pass over the mbox: each separator line is compared (by length and
    fingerprint) with the separators noted; only a match is hashed further.
    """
    wanted: dict[tuple[int, str], list[tuple[Pending, Entry]]] = {}
    for pending, entry in missing:
        wanted.setdefault((entry.head, entry.head_sha), []).append((pending, entry))
    lengths = {length for length, _ in wanted}
    found: dict[str, tuple[Pending, Entry]] = {}
    for start in _separator_starts(fd, size):
        for length in lengths:
            for pending, entry in wanted.get(
                (length, _fingerprint(os.pread(fd, length, start))), []
            ):
                moved = dataclasses.replace(entry, offset=start, pad=0)
                if pending.name not in found and _holds(fd, moved, size):
                    found[pending.name] = (pending, moved)
        if len(found) == len(missing):
            break
    return list(found.values())


def _separator_starts(fd: int, size: int) -> Iterator[int]:
    """Offsets of the lines in the mbox that start with ``From ``."""
    pos, carry = 0, b"\n"  # the file's start counts as a line start
    while pos < size:
        chunk = os.pread(fd, min(READ_CHUNK, size - pos), pos)
        if not chunk:
            return
        data, base = carry + chunk, pos - len(carry)
        at = data.find(b"\nFrom ")
        while at >= 0:
            yield base + at + 1
            at = data.find(b"\nFrom ", at + 1)
        carry, pos = data[-5:], pos + len(chunk)


def _separator_after(fd: int, start: int, size: int) -> bool:
    """Whether a line in [start, size) starts with ``From `` (start is a line start)."""
    carry = b"\n"
    while start < size:
        chunk = os.pread(fd, min(READ_CHUNK, size - start), start)
        if not chunk:
            break
        if b"\nFrom " in carry + chunk:
            return True
        carry = (carry + chunk)[-5:]
        start += len(chunk)
    return False
