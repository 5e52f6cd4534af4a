"""Durable, idempotent delivery into a Maildir.

Contract
--------
A message is streamed into ``tmp/<name>``, fsynced and closed, then published
with ``link(tmp/<name>, new/<name>)`` and the ``tmp/`` entry removed -- the
delivery protocol of qmail's maildir(5) and D. J. Bernstein's "Using maildir
format". ``link()`` (never ``rename()``, which silently replaces its target)
means an existing message is never overwritten.

Durability order (PROTOCOL-NOTES §2 "Durability gap", §3 "Ordering rules")::

    write -> fsync file -> close -> link into new/ -> fsync new/
          -> (caller) commit "delivered" in the ledger -> (caller) DELE

:meth:`TmpMessage.finish` does the first three, :meth:`Maildir.deliver` the
link, :meth:`Maildir.sync_new` the directory fsync. Without that last step the
link itself may vanish on power loss while the server has already deleted the
message (invariant I1).

Invariants
----------
* **No server byte reaches a path.** :func:`unique_name` hashes the account,
  UID and occurrence; a name is ``<first_seen>.P<32 hex>.<escaped host>``, which
  contains no ``/`` or ``:`` and never starts with a dot. Every name given to a
  method is checked the same way, so a corrupt ledger row cannot escape the
  Maildir either.
* **Exactly once (I2).** Names are deterministic, so a re-run after a crash
  (PROTOCOL-NOTES §3, window W3) finds the earlier copy -- in ``new/``, or in
  ``cur/`` with a ``:2,<flags>`` suffix once a mail reader has seen it -- and
  :meth:`Maildir.deliver` treats identical content as already delivered.
  Different content under the same name raises :class:`DeliveryConflict`.
* **Nothing half-written is ever linked.** Any ``OSError`` while writing,
  fsyncing or closing discards the tmp file: after a failed fsync, a retried
  fsync may report success for data the kernel already dropped (PROTOCOL-NOTES
  §3 "fsync errors"), so the only safe answer is to fetch again later.
* **No symlink games.** ``tmp/``, ``new/`` and ``cur/`` must be real
  directories; they are opened once with ``O_NOFOLLOW`` and every later
  operation goes through those directory descriptors (``openat``/``linkat``),
  so swapping a directory for a symlink later achieves nothing. Files are
  created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and mode 0600 (the getmail
  CVE-2004-0880 lesson); directories popsync creates get mode 0700.
* **No other user can touch a delivery.** The Maildir and its ``tmp/``,
  ``new/`` and ``cur/`` must be owned by the user popsync runs as and not be
  writable by group or others (:class:`UnsafeMaildir` otherwise): whoever can
  write ``tmp/`` could swap a file between its fsync and its link, landing a
  forged message in ``new/`` while the real one is deleted from the server.
  As a second line, :meth:`Maildir.deliver` links the very file it wrote --
  from its descriptor through ``/proc/self/fd`` where there is one -- after
  checking that ``tmp/<name>`` is still that file (device, inode, one link).
* **Root follows only root's symlinks.** Run as root, the Maildir path is
  resolved one component at a time with ``O_NOFOLLOW``, and a symlink owned by
  anyone but root is refused, so a user cannot point root's deliveries (and
  the directories it creates) into a place only root may write. Together with
  the ownership rule above, root delivers only into root's own Maildirs.

Concurrency: the caller holds a per-account lock (DESIGN §4), so no other
process writes popsync names of this account into this Maildir. Other programs
(the mail reader, another MDA) may move, rename and delete files at any time.

Bytes are stored exactly as given (I5): any CRLF -> LF conversion happens in
the caller's sink, not here.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import shlex
import socket
import stat
import time
import weakref
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Self

from popsync.errors import DeliveryError

__all__ = [
    "DeliveryConflict",
    "Maildir",
    "MaildirIndex",
    "TmpMessage",
    "UnsafeMaildir",
    "delivery_hash",
    "file_digest",
    "name_hash",
    "unique_name",
]

#: File systems on which Maildir delivery works only with care (PROTOCOL-NOTES
#: §2 "NFS"): link() may report failure although it worked, O_EXCL needs NFSv3+.
NETWORK_FS_TYPES = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "sshfs", "9p", "afs"}
)

_DIR_MODE = 0o700
_FILE_MODE = 0o600
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: Where a descriptor can be named to link() the very file it refers to (Linux).
_PROC_FD = "/proc/self/fd"
#: As path resolution in the kernel (MAXSYMLINKS).
_MAX_SYMLINKS = 40
#: Small writes are gathered up to this size before one os.write(); larger
#: writes bypass the buffer. Bounds the memory of an open message.
_WRITE_BUFFER = 256 * 1024
#: Chunk size for reading a file back (digests on recovery).
_READ_CHUNK = 1024 * 1024
#: Longest escaped host part; the name stays far below NAME_MAX (255) even
#: after a reader appends ":2,<flags>" or Dovecot its ",S=<size>".
_HOST_MAX = 64
#: Longest name accepted from a caller (ours are at most ~120 characters).
_NAME_MAX = 200

# A popsync name: <first_seen>.P<32 hex>.<escaped host>. Strict form for
# deciding which tmp/ files are ours to sweep.
_OUR_NAME = re.compile(r"[0-9]+\.P[0-9a-f]{32}\.[A-Za-z0-9.\\-]+")
# Loose form for recognising a delivered file by its hash even if something
# appended to the name (e.g. Dovecot's ",S=<size>").
_HASH_PREFIX = re.compile(r"[0-9]+\.(P[0-9a-f]{32})\.")
_HOST_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-")
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


class DeliveryConflict(DeliveryError):
    """A different message already sits under the name popsync derived.

    The same account, UID and occurrence produced different bytes this time
    (UID reuse by the server, or a tampered file). Nothing was overwritten;
    retrying will not help until someone decides, hence not temporary.
    """

    temporary = False

    def __init__(self, message: str, existing: Path) -> None:
        super().__init__(message)
        self.existing = existing


class UnsafeMaildir(DeliveryError):
    """Another user could tamper with deliveries into this Maildir.

    A Maildir directory owned by someone else or writable by group or others,
    or (as root) a path through another user's symlink. Not temporary: it
    stays unsafe until someone fixes the modes or the path.
    """

    temporary = False


# --------------------------------------------------------------------- names


def delivery_hash(account: str, uid: bytes, occurrence: int) -> str:
    """Return ``P`` + the first 32 hex digits of SHA-256(account ‖ 0 ‖ uid ‖ 0 ‖ occurrence).

    *occurrence* (0 for the first message listing this UID, 1 for the second
    ...) tells apart duplicate UIDs, which RFC 1939 §7 does not forbid. It is
    hashed as decimal ASCII. The encoding is injective because an account name
    cannot contain NUL and the occurrence is digits only.

    Raises ValueError for an empty account, one containing NUL, or a negative
    occurrence; TypeError if *uid* is not bytes.
    """
    if not account or "\0" in account:
        raise ValueError("account name must be non-empty and contain no NUL")
    if not isinstance(uid, bytes):
        raise TypeError("uid must be bytes, exactly as the server sent it")
    if occurrence < 0:
        raise ValueError("occurrence must be >= 0")
    digest = hashlib.sha256()
    digest.update(account.encode("utf-8"))
    digest.update(b"\0")
    digest.update(uid)
    digest.update(b"\0")
    digest.update(str(occurrence).encode("ascii"))
    return "P" + digest.hexdigest()[:32]


def _escape_host(host: str) -> str:
    """Escape a host name for the third part of a Maildir name.

    maildir(5) asks for ``/`` -> ``\\057`` and ``:`` -> ``\\072``; we escape
    every byte outside ``[A-Za-z0-9.-]`` the same way (backslash included, so
    the escaping is unambiguous), cut at an escape boundary after _HOST_MAX
    characters.
    """
    out: list[str] = []
    length = 0
    for byte in host.encode("utf-8", "surrogateescape"):
        piece = chr(byte) if byte in _HOST_SAFE else f"\\{byte:03o}"
        if length + len(piece) > _HOST_MAX:
            break
        out.append(piece)
        length += len(piece)
    return "".join(out) or "localhost"


def unique_name(
    account: str, uid: bytes, occurrence: int, first_seen: int, host: str | None = None
) -> str:
    """Return the deterministic Maildir name for one server message.

    ``<first_seen>.P<sha256(account ‖ 0x00 ‖ uid ‖ 0x00 ‖ occurrence)[:32 hex]>.<host>``
    (PROTOCOL-NOTES §2 "Idempotent delivery"). *first_seen* is the epoch second
    the message was first listed; store the name in the ledger before RETR.
    *host* defaults to ``socket.gethostname()`` and is escaped (see
    :func:`_escape_host`). The result matches ``[0-9]+\\.P[0-9a-f]{32}\\.[A-Za-z0-9.\\\\-]+``:
    no ``/``, no ``:``, no leading dot, no server byte.

    Raises ValueError for a negative *first_seen* and as :func:`delivery_hash`.
    """
    if first_seen < 0:
        raise ValueError("first_seen must be >= 0")
    host_part = _escape_host(socket.gethostname() if host is None else host)
    return f"{int(first_seen)}.{delivery_hash(account, uid, occurrence)}.{host_part}"


def name_hash(name: str, info_sep: str = ":") -> str:
    """Return the ``P<32 hex>`` part of a popsync name (with or without info).

    Two files with the same hash are the same server message whatever their
    timestamp or host part, which is how recovery recognises a delivery made
    under an older name (say, before the machine was renamed).

    Raises ValueError if *name* is not a popsync name.
    """
    found = _hash_of(name.split(info_sep, 1)[0])
    if found is None:
        raise ValueError(f"not a popsync Maildir name: {name!r}")
    return found


def _hash_of(base: str) -> str | None:
    match = _HASH_PREFIX.match(base)
    return match.group(1) if match else None


def _check_name(name: str, info_sep: str) -> None:
    """Refuse anything that is not a plain, harmless file name.

    Names come from unique_name() via the ledger; this guards against a corrupt
    row turning into ``../../somewhere``.
    """
    if (
        not name
        or len(name) > _NAME_MAX
        or name.startswith(".")
        or info_sep in name
        or ":" in name
        or "/" in name
        or not all(0x21 <= ord(ch) <= 0x7E for ch in name)
    ):
        raise ValueError(f"unsafe Maildir name: {name!r}")


# ------------------------------------------------------------------- helpers


def _error(action: str, path: Path | str, exc: OSError) -> DeliveryError:
    """Build a DeliveryError naming the file and the errno (ENOSPC, EIO, ...)."""
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else "error"
    text = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    return DeliveryError(f"cannot {action} {path}: {code} ({text})")


def _open_regular(name: str, dir_fd: int | None, shown: Path | str) -> int:
    """Open a regular file for reading without following a symlink or blocking on a FIFO.

    Raises DeliveryError if it cannot be opened or is not a regular file.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        raise _error("open", shown, exc) from exc
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise _error("stat", shown, exc) from exc
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DeliveryError(f"{shown} is not a regular file")
    return fd


def _digest_fd(fd: int, shown: Path | str) -> tuple[int, str]:
    """(size, sha256 hex) of an open file, read in fixed chunks (memory stays flat)."""
    digest = hashlib.sha256()
    size = 0
    buf = bytearray(_READ_CHUNK)
    view = memoryview(buf)
    try:
        with open(fd, "rb", buffering=0, closefd=False) as raw:
            while n := raw.readinto(view):
                digest.update(view[:n])
                size += n
    except OSError as exc:
        raise _error("read", shown, exc) from exc
    return size, digest.hexdigest()


def file_digest(path: Path | str) -> tuple[int, str]:
    """Return (size, SHA-256 hex) of a delivered file, for recovery and verification.

    Reads in 1 MiB chunks. Refuses symlinks and anything but a regular file
    (a FIFO planted under a message name must not hang a poll).

    Raises DeliveryError if the file cannot be opened or read.
    """
    fd = _open_regular(os.fspath(path), None, path)
    try:
        return _digest_fd(fd, path)
    finally:
        os.close(fd)


def _fs_type_from_mountinfo(text: str, dev: int) -> str | None:
    """File system type of the mount whose device is *dev*, from /proc/self/mountinfo text.

    Matching by device number (not by path prefix) is immune to symlinks and
    bind mounts. The last match wins, as later mounts shadow earlier ones.
    """
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    found: str | None = None
    for line in text.splitlines():
        fields = line.split()
        # id parent major:minor root mountpoint options [optional...] - fstype source super
        if len(fields) < 8 or fields[2] != wanted or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if sep + 1 < len(fields):
            found = fields[sep + 1]
    return found


def _fs_type_from_mounts(text: str, path: str) -> str | None:
    """File system type from /proc/mounts text by longest mount-point prefix."""
    best: tuple[int, str] | None = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), fields[2])
    return best[1] if best else None


# ------------------------------------------------------------ who may write


def _check_private(fd: int, shown: Path) -> None:
    """Refuse a Maildir directory that another user could write into.

    Whoever can write ``tmp/`` (or rename in the Maildir) can swap a file
    between its fsync and its link. Checked on the open descriptor, so it
    is the directory actually used. Raises UnsafeMaildir, or DeliveryError if
    fstat fails.
    """
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise _error("stat", shown, exc) from exc
    me = os.geteuid()
    if st.st_uid != me:
        raise UnsafeMaildir(
            f"Maildir directory {shown} is owned by uid {st.st_uid}, but popsync runs as "
            f"uid {me}: its owner could swap messages as they are delivered; run popsync "
            "as that user, or deliver into a directory of your own"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeMaildir(
            f"Maildir directory {shown} is writable by group or others, who could swap "
            f"messages as they are delivered; run: chmod go-w {shlex.quote(str(shown))}"
        )


def _open_as_root(path: Path, create: bool) -> int:
    """Open the Maildir directory *path* as root, following only root's symlinks.

    Each component is opened with ``O_NOFOLLOW`` relative to the descriptor of
    the one before, so nothing can be swapped between a check and its use. A
    symlink is followed (its target resolved the same way) only if root owns
    it; with *create*, a missing component is made (mode 0700) on the way.
    Refusing other users' symlinks keeps a user from pointing root's
    deliveries into a directory only root may write.

    Raises UnsafeMaildir for another user's symlink; DeliveryError if a
    component is missing (without *create*), is not a directory, or there
    are more than 40 symlinks.
    """
    text = os.fspath(path)
    fd = os.open("/" if os.path.isabs(text) else ".", _DIR_FLAGS)
    todo = _components(text)
    walked = "/" if os.path.isabs(text) else ""
    followed = 0
    try:
        while todo:
            part = todo.pop()
            step = _step_as_root(fd, part, os.path.join(walked, part), path, create)
            if isinstance(step, int):
                os.close(fd)
                fd, walked = step, os.path.join(walked, part)
                continue
            followed += 1
            if followed > _MAX_SYMLINKS:
                raise DeliveryError(f"Maildir {path}: too many levels of symbolic links")
            todo.extend(_components(step))
            if os.path.isabs(step):
                os.close(fd)
                fd, walked = os.open("/", _DIR_FLAGS), "/"
    except BaseException:
        os.close(fd)
        raise
    return fd


def _components(text: str) -> list[str]:
    """The names of a path, last first (a stack to pop from)."""
    return [part for part in reversed(text.split("/")) if part not in ("", ".")]


def _step_as_root(dir_fd: int, part: str, shown: str, path: Path, create: bool) -> int | str:
    """Open directory *part* under *dir_fd*: its descriptor, or a root symlink's target."""
    for _ in range(2):
        try:
            return os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
        except FileNotFoundError as exc:
            if not create:
                raise DeliveryError(f"Maildir {path} does not exist") from exc
            try:
                os.mkdir(part, _DIR_MODE, dir_fd=dir_fd)
            except FileExistsError:
                pass  # made meanwhile: look again
            except OSError as err:
                raise _error("create", shown, err) from err
        except OSError as exc:
            # O_NOFOLLOW|O_DIRECTORY on a symlink fails with ELOOP or ENOTDIR.
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise _error("open Maildir", shown, exc) from exc
            return _root_symlink_target(dir_fd, part, shown, path)
    raise DeliveryError(f"Maildir {path}: {shown} keeps changing; refusing")


def _root_symlink_target(dir_fd: int, part: str, shown: str, path: Path) -> str:
    """The target of symlink *part* if root owns it; UnsafeMaildir if another user does.

    On Linux the link itself is opened (``O_PATH|O_NOFOLLOW``), so its owner
    and its target are read from the same inode; elsewhere lstat and
    readlink are two look-ups.
    """
    try:
        if hasattr(os, "O_PATH"):
            link_fd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                st = os.fstat(link_fd)
                target = os.readlink("", dir_fd=link_fd) if stat.S_ISLNK(st.st_mode) else ""
            finally:
                os.close(link_fd)
        else:  # pragma: no cover - not Linux
            st = os.lstat(part, dir_fd=dir_fd)
            target = os.readlink(part, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else ""
    except OSError as exc:
        raise _error("open Maildir", shown, exc) from exc
    where = f"Maildir {path}" if shown == os.fspath(path) else f"Maildir {path}: {shown}"
    if not stat.S_ISLNK(st.st_mode):
        raise DeliveryError(f"{where} is not a directory")
    if st.st_uid != 0:
        raise UnsafeMaildir(
            f"{where} is a symlink owned by uid {st.st_uid}, and popsync "
            "running as root follows only root's symlinks; run popsync as the Maildir's "
            "owner, or name the real directory"
        )
    return target


@functools.cache
def _proc_links() -> bool:
    """Whether a file can be linked from its descriptor through /proc/self/fd."""
    return os.path.isdir(_PROC_FD)


# --------------------------------------------------------------- tmp message


class _State(Enum):
    OPEN = "open"
    FINISHED = "finished"
    DELIVERED = "delivered"
    DISCARDED = "discarded"


class TmpMessage:
    """A message being written into ``tmp/``; create with :meth:`Maildir.open_tmp`.

    Use as a context manager: leaving the block without a successful
    :meth:`Maildir.deliver` removes the tmp file. Not thread-safe.
    """

    def __init__(self, maildir: Maildir, name: str, fd: int, dev: int, ino: int) -> None:
        self._maildir = maildir
        self.name = name
        self._fd = fd
        self._ident = (dev, ino)
        # After finish(): a second descriptor on the file, to link() exactly
        # this inode into new/ (see Maildir.deliver); -1 when there is none.
        # Closed on delivery or abort, else when the object is collected (a
        # finished message a failed poll never delivered must not leak it).
        self._link_fd = -1
        self._link_fd_closer: weakref.finalize[[int], TmpMessage] | None = None
        self._buf = bytearray()
        self._sha = hashlib.sha256()
        self._size = 0
        self._state = _State.OPEN

    @property
    def path(self) -> Path:
        """Where the file is while being written: ``<maildir>/tmp/<name>``."""
        return self._maildir.path / "tmp" / self.name

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._size

    @property
    def sha256_hex(self) -> str:
        """SHA-256 (hex) of the bytes written so far."""
        return self._sha.hexdigest()

    @property
    def finished(self) -> bool:
        return self._state is _State.FINISHED

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append *data*; small writes are gathered, large ones go straight to the fd.

        Raises DeliveryError (the tmp file is then already removed) on any
        OSError; ValueError if the message is no longer open.
        """
        self._require(_State.OPEN)
        view = memoryview(data).cast("B")
        count = view.nbytes
        if not count:
            return
        self._sha.update(view)
        self._size += count
        if self._buf and len(self._buf) + count > _WRITE_BUFFER:
            self._flush()
        if count >= _WRITE_BUFFER:
            self._write_all(view)
        else:
            self._buf += view

    def finish(self, *, fsync: bool = True) -> None:
        """Flush, fsync (unless *fsync* is False) and close the file.

        ``fsync=False`` gives up durability (I1) and is meant for tests and
        benchmarks only. Where /proc is available a duplicate descriptor is
        kept until delivery, so :meth:`Maildir.deliver` links this very file.
        Raises DeliveryError on any OSError -- the tmp file is removed, never
        to be linked; ValueError if not open.
        """
        self._require(_State.OPEN)
        self._flush()
        fd, self._fd = self._fd, -1
        try:
            if fsync:
                os.fsync(fd)
        except OSError as exc:
            self._close_quietly(fd)
            self.abort()
            raise _error("fsync", self.path, exc) from exc
        if _proc_links():
            with contextlib.suppress(OSError):  # without it, deliver() links by name
                self._link_fd = os.dup(fd)
                self._link_fd_closer = weakref.finalize(self, self._close_quietly, self._link_fd)
        try:
            # close() can report a deferred write error (NFS): the data is not safe.
            os.close(fd)
        except OSError as exc:
            self.abort()
            raise _error("close", self.path, exc) from exc
        self._state = _State.FINISHED

    def abort(self) -> None:
        """Close and remove the tmp file. Idempotent; never raises."""
        if self._state in (_State.DELIVERED, _State.DISCARDED):
            return
        self._state = _State.DISCARDED
        self._buf = bytearray()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self._close_quietly(fd)
        self._close_link_fd()
        self._maildir._unlink_tmp(self.name)

    def _delivered(self) -> None:
        """The message is in new/ or cur/: drop the tmp entry (a leftover is swept later)."""
        self._state = _State.DELIVERED
        self._close_link_fd()
        self._maildir._unlink_tmp(self.name)

    def _close_link_fd(self) -> None:
        self._link_fd = -1
        if self._link_fd_closer is not None:
            self._link_fd_closer()  # closes the descriptor once; later calls do nothing

    def _require(self, state: _State) -> None:
        if self._state is not state:
            raise ValueError(f"{self.path} is {self._state.value}, not {state.value}")

    def _flush(self) -> None:
        if self._buf:
            buf, self._buf = self._buf, bytearray()
            self._write_all(memoryview(buf))

    def _write_all(self, view: memoryview) -> None:
        # os.write may write less than asked (and retries EINTR itself, PEP 475).
        try:
            while view:
                written = os.write(self._fd, view)
                if written <= 0:
                    raise OSError(errno.EIO, "write() made no progress")
                view = view[written:]
        except OSError as exc:
            self.abort()
            raise _error("write", self.path, exc) from exc

    @staticmethod
    def _close_quietly(fd: int) -> None:
        with contextlib.suppress(OSError):
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state is not _State.DELIVERED:
            self.abort()

    def __repr__(self) -> str:
        return f"TmpMessage({self.name!r}, {self._state.value}, size={self._size})"


# -------------------------------------------------------------------- index


class MaildirIndex:
    """One reading of ``new/`` and ``cur/``, for many O(1) lookups.

    Keys are base names (the part before the info separator). ``new/`` is read
    before ``cur/``: a file a reader moves from new/ to cur/ meanwhile is then
    seen at least once. A file renamed *within* cur/ during the scan (a flag
    change) may be missed -- readdir() promises nothing for entries that change
    under it -- which is why the ledger stays the primary record
    (PROTOCOL-NOTES §2 "Limit").
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._where: dict[str, str] = {}  # base name -> "new/<file>" or "cur/<file>"
        self._by_hash: dict[str, str] = {}  # "P<hex>" -> base name

    def _add(self, base: str, relative: str) -> None:
        if base in self._where:
            return
        self._where[base] = relative
        p_hash = _hash_of(base)
        if p_hash is not None:
            self._by_hash.setdefault(p_hash, base)

    def find(self, name: str) -> Path | None:
        """The delivered file for base name *name*, or None."""
        relative = self._where.get(name)
        return self._root / relative if relative is not None else None

    def find_hash(self, p_hash: str) -> Path | None:
        """A delivered file whose name carries *p_hash* (as :func:`name_hash` returns)."""
        base = self._by_hash.get(p_hash)
        return self.find(base) if base is not None else None

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)


# ------------------------------------------------------------------- maildir


class _DirFds:
    """The directory descriptors of one Maildir; closed once, by close() or GC."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.closed = False

    def close(self) -> None:
        self.closed = True
        fds, self.fds = self.fds, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)


class Maildir:
    """A Maildir that popsync delivers into.

    Holds descriptors on the Maildir and its ``tmp/ new/ cur/``; use as a
    context manager or call :meth:`close` (they are also closed when the
    object is garbage-collected). Not thread-safe; one instance per account
    poll is the intended use.
    """

    def __init__(self, path: Path | str, *, create: bool = True, info_sep: str = ":") -> None:
        """Open (and with *create*, make) the Maildir at *path*.

        *info_sep* separates a name from its ``2,<flags>`` info in ``cur/``;
        use e.g. ``";"`` or ``"!"`` on file systems that forbid ``:``.

        Raises UnsafeMaildir if the Maildir or tmp/, new/, cur/ is owned by
        another user or writable by group or others, or (run as root) its path
        goes through a symlink root does not own. Raises DeliveryError if *path*
        (or tmp/, new/, cur/) is missing and *create* is False, is not a
        directory, is a symlink (the subdirectories only; the Maildir itself
        may be a symlink), or tmp/ or new/ is not writable. Raises ValueError
        for an unusable *info_sep*.
        """
        if len(info_sep) != 1 or ord(info_sep) in _HOST_SAFE or info_sep in "/\\\0":
            raise ValueError(f"unusable info separator: {info_sep!r}")
        self.path = Path(path)
        self.info_sep = info_sep
        self._fds = _DirFds()
        self._finalizer = weakref.finalize(self, self._fds.close)
        self._known: MaildirIndex | None = None
        try:
            self._open(create)
        except BaseException:
            self.close()
            raise

    def _open(self, create: bool) -> None:
        root = _open_as_root(self.path, create) if os.geteuid() == 0 else self._open_root(create)
        self._fds.fds["root"] = root
        _check_private(root, self.path)
        for sub in ("tmp", "new", "cur"):
            self._fds.fds[sub] = fd = self._open_sub(root, sub, create)
            _check_private(fd, self.path / sub)
        for sub in ("tmp", "new"):
            if not os.access(sub, os.W_OK | os.X_OK, dir_fd=root):
                raise DeliveryError(f"Maildir directory {self.path / sub} is not writable")

    def _open_root(self, create: bool) -> int:
        if create:
            try:
                os.makedirs(self.path, mode=_DIR_MODE, exist_ok=True)
            except FileExistsError as exc:
                raise DeliveryError(f"Maildir {self.path} exists but is not a directory") from exc
            except OSError as exc:
                raise _error("create Maildir", self.path, exc) from exc
        try:
            return os.open(self.path, _DIR_FLAGS)
        except FileNotFoundError as exc:
            raise DeliveryError(f"Maildir {self.path} does not exist") from exc
        except NotADirectoryError as exc:
            raise DeliveryError(f"Maildir {self.path} is not a directory") from exc
        except OSError as exc:
            raise _error("open Maildir", self.path, exc) from exc

    def _open_sub(self, root: int, sub: str, create: bool) -> int:
        shown = self.path / sub
        if create:
            try:
                os.mkdir(sub, _DIR_MODE, dir_fd=root)
            except FileExistsError:
                pass  # checked below, whatever it is
            except OSError as exc:
                raise _error("create", shown, exc) from exc
        try:
            return os.open(sub, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=root)
        except FileNotFoundError as exc:
            raise DeliveryError(f"{shown} is missing: not a Maildir") from exc
        except OSError as exc:
            try:
                is_link = stat.S_ISLNK(os.lstat(sub, dir_fd=root).st_mode)
            except OSError:
                is_link = False
            if is_link:
                raise DeliveryError(f"{shown} is a symlink; refusing to deliver") from exc
            if exc.errno == errno.ENOTDIR:
                raise DeliveryError(f"{shown} is not a directory") from exc
            raise _error("open", shown, exc) from exc

    def _fd(self, sub: str) -> int:
        if self._fds.closed:
            raise ValueError(f"Maildir {self.path} is closed")
        return self._fds.fds[sub]

    def close(self) -> None:
        """Close the directory descriptors. Idempotent."""
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Maildir({str(self.path)!r})"

    # ------------------------------------------------------------- writing

    def open_tmp(self, name: str) -> TmpMessage:
        """Create ``tmp/<name>`` (``O_EXCL|O_NOFOLLOW``, mode 0600) for writing.

        A regular file already there is a leftover of a crashed earlier run of
        ours (names derive from account and UID, and the caller holds the
        account lock): it is removed and creation retried once. Anything else
        there -- a symlink, a FIFO, a directory -- is left alone and refused.

        Raises DeliveryError on any failure; ValueError for an unsafe name.
        """
        _check_name(name, self.info_sep)
        tmp = self._fd("tmp")
        shown = self.path / "tmp" / name
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for attempt in range(2):
            try:
                fd = os.open(name, flags, _FILE_MODE, dir_fd=tmp)
                break
            except FileExistsError as exc:
                if attempt:
                    raise DeliveryError(f"{shown} keeps reappearing; refusing") from exc
                self._remove_stale_tmp(name, shown, exc)
            except OSError as exc:
                raise _error("create", shown, exc) from exc
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            self._unlink_tmp(name)
            raise _error("stat", shown, exc) from exc
        return TmpMessage(self, name, fd, st.st_dev, st.st_ino)

    def _remove_stale_tmp(self, name: str, shown: Path, exc: FileExistsError) -> None:
        tmp = self._fd("tmp")
        try:
            mode = os.lstat(name, dir_fd=tmp).st_mode
        except FileNotFoundError:
            return
        except OSError as err:
            raise _error("stat", shown, err) from err
        if not stat.S_ISREG(mode):
            raise DeliveryError(f"{shown} exists and is not a regular file; refusing") from exc
        try:
            os.unlink(name, dir_fd=tmp)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise _error("remove stale", shown, err) from err

    def _unlink_tmp(self, name: str) -> None:
        """Remove tmp/<name>; best effort (a leftover is swept later)."""
        try:
            if self._fds.closed:
                os.unlink(self.path / "tmp" / name)
            else:
                os.unlink(name, dir_fd=self._fds.fds["tmp"])
        except OSError:
            pass

    def deliver(self, tmp: TmpMessage) -> Path:
        """Publish a finished tmp message as ``new/<name>``; return where it now is.

        ``link()`` never replaces an existing file. If the name is already
        delivered -- in ``new/``, or in ``cur/`` as ``<name>`` or
        ``<name><sep><info>`` after a reader saw it -- with the same size and
        SHA-256, the tmp file is dropped and the existing path returned
        (idempotent re-delivery after a crash, PROTOCOL-NOTES §3 W3).

        Only the file written is ever linked: ``tmp/<name>`` must still be it
        (same device and inode, a regular file with one link), and where /proc
        is available the link is made from the file's descriptor, so a swap
        after that check links nothing else either.

        On NFS, link() may fail although it worked (link(2)); any error but
        EEXIST is therefore checked by comparing the inode of ``new/<name>``
        with the tmp file's before it counts as a failure.

        The tmp file is removed in every outcome. Call :meth:`sync_new` before
        recording the delivery.

        Raises DeliveryConflict if different content holds the name (nothing is
        overwritten), DeliveryError if ``tmp/<name>`` is no longer the file
        written or for any other failure, ValueError if *tmp* is not a finished
        message of this Maildir.
        """
        if tmp._maildir is not self:
            raise ValueError(f"{tmp!r} belongs to another Maildir")
        tmp._require(_State.FINISHED)
        try:
            return self._deliver(tmp)
        finally:
            tmp.abort()  # a no-op once delivered; otherwise nothing is left in tmp/

    def _deliver(self, tmp: TmpMessage) -> Path:
        name = tmp.name
        new = self._fd("new")
        # The cur/ check is what link()'s EEXIST cannot do (Dovecot's Maildir
        # notes): a reader may have moved an earlier copy there. Scanning cur/
        # costs O(n), so it is done only for names an index of new/ and cur/,
        # taken once per Maildir object, says may exist. Names created after
        # the index come only from us (account lock) and are added to it.
        if name in self._index():
            in_cur = self._find_in_cur(name)
            if in_cur is not None:
                self._settle_existing(tmp, "cur", in_cur)
                return self.path / "cur" / in_cur
        try:
            self._link_into_new(tmp)
        except FileExistsError:
            self._settle_existing(tmp, "new", name)
        except OSError as exc:
            if not self._is_same_file(new, name, tmp._ident):
                tmp.abort()
                raise _error("link into new/", self.path / "new" / name, exc) from exc
            tmp._delivered()
        else:
            tmp._delivered()
        self._index()._add(name, f"new/{name}")
        return self.path / "new" / name

    def _link_into_new(self, tmp: TmpMessage) -> None:
        """link() the file *tmp* wrote to ``new/<name>``; OSError as link() raises it.

        Checks first that ``tmp/<name>`` is still that file, then links from
        the descriptor (``linkat`` with ``AT_SYMLINK_FOLLOW`` on
        ``/proc/self/fd/N`` links the inode itself), or by name without /proc.
        Raises DeliveryError if ``tmp/<name>`` was replaced or linked elsewhere.
        """
        tmp_dir, new = self._fd("tmp"), self._fd("new")
        try:
            st = os.lstat(tmp.name, dir_fd=tmp_dir)
        except OSError as exc:
            raise _error("stat", tmp.path, exc) from exc
        if (st.st_dev, st.st_ino) != tmp._ident or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise DeliveryError(
                f"{tmp.path} was replaced or linked elsewhere after popsync wrote it; "
                f"not delivered (is another program writing into {self.path / 'tmp'}?)"
            )
        if tmp._link_fd >= 0:
            source = f"{_PROC_FD}/{tmp._link_fd}"
            os.link(source, tmp.name, dst_dir_fd=new, follow_symlinks=True)
        else:
            os.link(tmp.name, tmp.name, src_dir_fd=tmp_dir, dst_dir_fd=new, follow_symlinks=False)

    @staticmethod
    def _is_same_file(dir_fd: int, name: str, ident: tuple[int, int]) -> bool:
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == ident

    def _settle_existing(self, tmp: TmpMessage, sub: str, filename: str) -> None:
        """*filename* in *sub* holds tmp's name: same content -> done, else conflict."""
        dir_fd = self._fd(sub)
        shown = self.path / sub / filename
        if self._is_same_file(dir_fd, filename, tmp._ident):
            tmp._delivered()  # our own link, e.g. an NFS link() that "failed"
            return
        try:
            fd = _open_regular(filename, dir_fd, shown)
            try:
                size = os.fstat(fd).st_size
                same = size == tmp.size and _digest_fd(fd, shown) == (tmp.size, tmp.sha256_hex)
            finally:
                os.close(fd)
        except (DeliveryError, OSError) as exc:
            tmp.abort()
            if isinstance(exc, OSError):
                raise _error("read", shown, exc) from exc
            raise
        if not same:
            tmp.abort()
            raise DeliveryConflict(
                f"{shown} already exists with different content "
                f"(new copy: {tmp.size} bytes, sha256 {tmp.sha256_hex}); not overwritten",
                shown,
            )
        tmp._delivered()

    def sync_new(self) -> None:
        """fsync the ``new/`` directory, making the links of :meth:`deliver` durable.

        The durability order, in full::

            write -> fsync file -> close      (TmpMessage.finish)
            -> link tmp/F to new/F            (Maildir.deliver)
            -> fsync new/                     (this method; once per batch is enough)
            -> (caller) commit "delivered" in the ledger
            -> (caller) DELE, never before that commit

        Linux fsync(2): fsync on a file does not make its directory entry
        durable; the directory needs its own fsync (PROTOCOL-NOTES §2).

        Raises DeliveryError if the fsync fails; the caller must then not
        record the batch as delivered (a retried fsync may lie, §3).
        """
        try:
            os.fsync(self._fd("new"))
        except OSError as exc:
            raise _error("fsync", self.path / "new", exc) from exc

    # ------------------------------------------------------------- finding

    def _index(self) -> MaildirIndex:
        if self._known is None:
            self._known = self.snapshot()
        return self._known

    def snapshot(self) -> MaildirIndex:
        """Read ``new/`` then ``cur/`` once; the index answers lookups in O(1).

        Only regular files count; names starting with a dot are skipped (maildir
        spec). Raises DeliveryError if a directory cannot be read.
        """
        index = MaildirIndex(self.path)
        for sub in ("new", "cur"):  # this order: see MaildirIndex
            try:
                with os.scandir(self._fd(sub)) as entries:
                    for entry in entries:
                        if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                            continue
                        index._add(entry.name.split(self.info_sep, 1)[0], f"{sub}/{entry.name}")
            except OSError as exc:
                raise _error("read", self.path / sub, exc) from exc
        return index

    def find(self, name: str) -> Path | None:
        """The delivered file for *name*: ``new/<name>``, ``cur/<name>`` or ``cur/<name><sep>*``.

        Costs a scan of cur/ when the name is not in new/ or exactly in cur/;
        use :meth:`snapshot` for many lookups. Raises DeliveryError if cur/
        cannot be read; ValueError for an unsafe name.
        """
        _check_name(name, self.info_sep)
        if self._is_regular(self._fd("new"), name):
            return self.path / "new" / name
        in_cur = self._find_in_cur(name)
        return self.path / "cur" / in_cur if in_cur is not None else None

    @staticmethod
    def _is_regular(dir_fd: int, name: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(name, dir_fd=dir_fd).st_mode)
        except OSError:
            return False

    def _find_in_cur(self, name: str) -> str | None:
        cur = self._fd("cur")
        if self._is_regular(cur, name):
            return name
        prefix = name + self.info_sep
        try:
            with os.scandir(cur) as entries:
                for entry in entries:
                    if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False):
                        return entry.name
        except OSError as exc:
            raise _error("read", self.path / "cur", exc) from exc
        return None

    # --------------------------------------------------------- housekeeping

    def sweep_tmp(self, max_age: float = 3600) -> int:
        """Remove popsync's own stale files from ``tmp/``; return how many.

        A file is removed only if its name has the exact shape of
        :func:`unique_name`, it is a regular file (symlinks are never followed
        or removed) owned by this user, and it was not modified for *max_age*
        seconds. Other programs' files are never touched. Call it before
        opening tmp files (at the start of a poll). Removal is best effort: a
        file that cannot be removed is skipped.

        Raises DeliveryError if tmp/ cannot be read; ValueError if *max_age* < 0.
        """
        if max_age < 0:
            raise ValueError("max_age must be >= 0")
        tmp = self._fd("tmp")
        now = time.time()
        me = os.geteuid()
        removed = 0
        try:
            with os.scandir(tmp) as entries:
                for entry in entries:
                    if not _OUR_NAME.fullmatch(entry.name):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if not stat.S_ISREG(st.st_mode) or st.st_uid != me:
                        continue
                    if now - st.st_mtime < max_age:
                        continue
                    try:
                        os.unlink(entry.name, dir_fd=tmp)
                    except OSError:
                        continue
                    removed += 1
        except OSError as exc:
            raise _error("read", self.path / "tmp", exc) from exc
        return removed

    def filesystem_type(self) -> str | None:
        """The file system type of ``new/`` (e.g. ``ext4``, ``nfs4``); None if unknown.

        Best effort, Linux only: /proc/self/mountinfo (matched by device
        number), else /proc/mounts (by path prefix).
        """
        try:
            dev = os.fstat(self._fd("new")).st_dev
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
                found = _fs_type_from_mountinfo(fh.read(), dev)
            if found is not None:
                return found
        except OSError:
            pass
        try:
            with open("/proc/mounts", encoding="utf-8", errors="replace") as fh:
                return _fs_type_from_mounts(fh.read(), os.path.realpath(self.path / "new"))
        except OSError:
            return None

    def is_on_nfs(self) -> bool:
        """True if the Maildir is on a network file system (nfs, nfs4, cifs, smb3, sshfs ...).

        Best effort, so the sync can warn: link() may lie there, and every host
        delivering needs its own host name (PROTOCOL-NOTES §2 "NFS").
        """
        return self.filesystem_type() in NETWORK_FS_TYPES
