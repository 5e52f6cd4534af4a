"""Durable, idempotent delivery into a Maildir.

Contract
--------
A message is streamed into ``tmp/<name>``, fsynced and closed, then published
with ``link(tmp/<name>, new/<name>)`` and the ``tmp/`` entry removed -- the
delivery protocol of qmail's maildir(5) and D. J. Bernstein's "Using maildir
format". ``link()`` (never ``rename()``, which silently replaces its target)
means an existing message is never overwritten.

Durability order::

    write -> fsync file -> close -> link into new/ -> fsync new/
          -> (caller) commit "delivered" in the ledger -> (caller) DELE

:meth:`TmpMessage.finish` does the first three, :meth:`Maildir.deliver` the
link, :meth:`Maildir.sync_new` the directory fsync. Without that last step the
link itself may vanish on power loss (fsync(2): syncing a file does not make
its directory entry durable) while the server has already deleted the
message.

Invariants
----------
* **No server byte reaches a path.** Names come from
  :func:`~popsync.deliver.maildir.names.unique_name`, and every name given to
  a method is checked again, so a corrupt ledger row cannot escape the
  Maildir either.
* **Exactly once.** Names are deterministic, so a re-run after a crash
  between the link and the ledger commit finds the earlier copy -- in
  ``new/``, or in ``cur/`` with a ``:2,<flags>`` suffix once a mail reader has
  seen it -- and :meth:`Maildir.deliver` treats identical content as already
  delivered. Different content under the same name raises
  :class:`DeliveryConflict`.
* **Nothing half-written is ever linked** (see
  :mod:`popsync.deliver.maildir.tmp`).
* **No symlink games.** ``tmp/``, ``new/`` and ``cur/`` must be real
  directories; they are opened once with ``O_NOFOLLOW`` and every later
  operation goes through those directory descriptors (``openat``/``linkat``),
  so swapping a directory for a symlink later achieves nothing. Files are
  created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` and mode 0600; directories
  popsync creates get mode 0700.
* **No other user can touch a delivery.** The Maildir and its ``tmp/``,
  ``new/`` and ``cur/`` must be owned by the user popsync runs as and not be
  writable by group or others (:class:`UnsafeMaildir` otherwise): whoever can
  write ``tmp/`` could swap a file between its fsync and its link, landing a
  forged message in ``new/`` while the real one is deleted from the server.
  As a second line, only the very file written is linked (the inode check of
  :meth:`TmpMessage.link_into`).
* **Root follows only root's symlinks** (see
  :mod:`popsync.deliver.maildir.paths`).

Concurrency: the caller holds the account's lock (:mod:`popsync.locks`), so no
other process writes popsync names of this account into this Maildir. Other
programs (the mail reader, another MDA) may move, rename and delete files at
any time.

Bytes are stored exactly as given: any CRLF -> LF conversion happens in the
caller's sink, not here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import stat
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Self

from popsync.deliver.maildir.errors import (
    DeliveryConflict,
    MaildirUnusable,
    UnsafeMaildir,
    os_error,
)
from popsync.deliver.maildir.files import (
    DIR_FLAGS,
    DIR_MODE,
    FILE_MODE,
    digest_fd,
    is_regular,
    open_regular,
)
from popsync.deliver.maildir.mounts import NETWORK_FS_TYPES, filesystem_type
from popsync.deliver.maildir.names import base_hash, check_info_sep, check_name, is_our_name
from popsync.deliver.maildir.paths import open_as_root
from popsync.deliver.maildir.tmp import TmpMessage
from popsync.errors import DeliveryError

__all__ = ["Maildir", "MaildirIndex"]


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
        raise os_error("stat", shown, exc) from exc
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


# -------------------------------------------------------------------- index


class MaildirIndex:
    """One reading of ``new/`` and ``cur/``, for many O(1) lookups.

    Keys are base names (the part before the info separator). ``new/`` is read
    before ``cur/``: a file a reader moves from new/ to cur/ meanwhile is then
    seen at least once. A file renamed *within* cur/ during the scan (a flag
    change) may be missed -- readdir(3) promises nothing for entries that
    change under it -- which is why the ledger stays the primary record.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._where: dict[str, str] = {}  # base name -> "new/<file>" or "cur/<file>"
        self._by_hash: dict[str, str] = {}  # "P<hex>" -> base name

    def add(self, base: str, relative: str) -> None:
        """Record that base name *base* is delivered at *relative* (``new/...`` or ``cur/...``).

        The first place recorded for a name wins.
        """
        if base in self._where:
            return
        self._where[base] = relative
        p_hash = base_hash(base)
        if p_hash is not None:
            self._by_hash.setdefault(p_hash, base)

    def find(self, name: str) -> Path | None:
        """The delivered file for base name *name*, or None."""
        relative = self._where.get(name)
        return self._root / relative if relative is not None else None

    def find_hash(self, p_hash: str) -> Path | None:
        """A delivered file whose name carries *p_hash* (as ``name_hash`` returns)."""
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


#: Errors opening or making the Maildir that stay until someone acts.
_LASTING_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOTDIR})


def _setup_error(action: str, path: Path | str, exc: OSError) -> DeliveryError:
    """:func:`os_error`, as MaildirUnusable (not temporary) for a lasting cause."""
    error = os_error(action, path, exc)
    return MaildirUnusable(str(error)) if exc.errno in _LASTING_ERRNOS else error


class Maildir:
    """A Maildir that popsync delivers into.

    Holds descriptors on the Maildir and its ``tmp/ new/ cur/``; use as a
    context manager or call :meth:`close` (they are also closed when the
    object is garbage-collected). Not thread-safe; one instance per account
    poll is the intended use.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        create: bool = True,
        parents: bool = False,
        info_sep: str = ":",
    ) -> None:
        """Open (and with *create*, make) the Maildir at *path*.

        *create* makes a missing Maildir (and its tmp/, new/, cur/) in an
        existing directory; its parent directories too only with *parents*:
        a typo in the path must not silently grow a tree of directories.

        *info_sep* separates a name from its ``2,<flags>`` info in ``cur/``;
        use e.g. ``";"`` or ``"!"`` on file systems that forbid ``:``.

        Raises UnsafeMaildir if the Maildir or tmp/, new/, cur/ is owned by
        another user or writable by group or others, or (run as root) its path
        goes through a symlink root does not own. Raises DeliveryError if *path*
        (or tmp/, new/, cur/) is missing and *create* is False, is not a
        directory, is a symlink (the subdirectories only; the Maildir itself
        may be a symlink), or tmp/ or new/ is not writable -- as
        MaildirUnusable (not temporary) when the cause stays until someone
        acts: a missing parent (without *parents*), a file in the way, no
        permission. Raises ValueError
        for an unusable *info_sep*.
        """
        check_info_sep(info_sep)
        self.path = Path(path)
        self.info_sep = info_sep
        self._fds = _DirFds()
        self._finalizer = weakref.finalize(self, self._fds.close)
        self._known: MaildirIndex | None = None
        try:
            if create and not parents:
                self._check_parent()
            self._open(create)
        except BaseException:
            self.close()
            raise

    def _check_parent(self) -> None:
        parent = self.path.absolute().parent
        try:
            is_dir = stat.S_ISDIR(os.stat(parent).st_mode)
        except FileNotFoundError:
            raise MaildirUnusable(
                f"Maildir {self.path}: parent directory {parent} does not exist; "
                "create it, or set create: true"
            ) from None
        except OSError as exc:
            raise _setup_error("reach the parent directory of Maildir", self.path, exc) from None
        if not is_dir:
            raise MaildirUnusable(f"Maildir {self.path}: {parent} is not a directory")

    def _open(self, create: bool) -> None:
        root = open_as_root(self.path, create) if os.geteuid() == 0 else self._open_root(create)
        self._fds.fds["root"] = root
        _check_private(root, self.path)
        for sub in ("tmp", "new", "cur"):
            self._fds.fds[sub] = fd = self._open_sub(root, sub, create)
            _check_private(fd, self.path / sub)
        for sub in ("tmp", "new"):
            if not os.access(sub, os.W_OK | os.X_OK, dir_fd=root):
                raise MaildirUnusable(f"Maildir directory {self.path / sub} is not writable")

    def _open_root(self, create: bool) -> int:
        if create:
            try:
                os.makedirs(self.path, mode=DIR_MODE, exist_ok=True)
            except FileExistsError as exc:
                raise MaildirUnusable(f"Maildir {self.path} exists but is not a directory") from exc
            except OSError as exc:
                raise _setup_error("create Maildir", self.path, exc) from exc
        try:
            return os.open(self.path, DIR_FLAGS)
        except FileNotFoundError as exc:
            raise DeliveryError(f"Maildir {self.path} does not exist") from exc
        except NotADirectoryError as exc:
            raise MaildirUnusable(f"Maildir {self.path} is not a directory") from exc
        except OSError as exc:
            raise _setup_error("open Maildir", self.path, exc) from exc

    def _open_sub(self, root: int, sub: str, create: bool) -> int:
        shown = self.path / sub
        if create:
            try:
                os.mkdir(sub, DIR_MODE, dir_fd=root)
            except FileExistsError:
                pass  # checked below, whatever it is
            except OSError as exc:
                raise _setup_error("create", shown, exc) from exc
        try:
            return os.open(sub, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=root)
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
                raise MaildirUnusable(f"{shown} is not a directory") from exc
            raise _setup_error("open", shown, exc) from exc

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
        check_name(name, self.info_sep)
        tmp = self._fd("tmp")
        shown = self.path / "tmp" / name
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for attempt in range(2):
            try:
                fd = os.open(name, flags, FILE_MODE, dir_fd=tmp)
                break
            except FileExistsError as exc:
                if attempt:
                    raise DeliveryError(f"{shown} keeps reappearing; refusing") from exc
                self._remove_stale_tmp(name, shown, exc)
            except OSError as exc:
                raise os_error("create", shown, exc) from exc
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            self.unlink_tmp(name)
            raise os_error("stat", shown, exc) from exc
        return TmpMessage(self, name, fd, st.st_dev, st.st_ino)

    def _remove_stale_tmp(self, name: str, shown: Path, exc: FileExistsError) -> None:
        tmp = self._fd("tmp")
        try:
            mode = os.lstat(name, dir_fd=tmp).st_mode
        except FileNotFoundError:
            return
        except OSError as err:
            raise os_error("stat", shown, err) from err
        if not stat.S_ISREG(mode):
            raise DeliveryError(f"{shown} exists and is not a regular file; refusing") from exc
        try:
            os.unlink(name, dir_fd=tmp)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise os_error("remove stale", shown, err) from err

    def unlink_tmp(self, name: str) -> None:
        """Remove ``tmp/<name>``; best effort, never raises (a leftover is swept later).

        Works after :meth:`close` too (by path then), so a TmpMessage can
        always clean up after itself.
        """
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
        (idempotent re-delivery after a crash between link and ledger commit).

        Only the file written is ever linked (:meth:`TmpMessage.link_into`).

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
        if tmp.owner is not self:
            raise ValueError(f"{tmp!r} belongs to another Maildir")
        tmp.require_finished()
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
            tmp.link_into(self._fd("tmp"), new)
        except FileExistsError:
            self._settle_existing(tmp, "new", name)
        except OSError as exc:
            if not tmp.is_at(new, name):
                tmp.abort()
                raise os_error("link into new/", self.path / "new" / name, exc) from exc
            tmp.mark_delivered()
        else:
            tmp.mark_delivered()
        self._index().add(name, f"new/{name}")
        return self.path / "new" / name

    def _settle_existing(self, tmp: TmpMessage, sub: str, filename: str) -> None:
        """*filename* in *sub* holds tmp's name: same content -> done, else conflict."""
        dir_fd = self._fd(sub)
        shown = self.path / sub / filename
        if tmp.is_at(dir_fd, filename):
            tmp.mark_delivered()  # our own link, e.g. an NFS link() that "failed"
            return
        try:
            fd = open_regular(filename, dir_fd, shown)
            try:
                size = os.fstat(fd).st_size
                same = size == tmp.size and digest_fd(fd, shown) == (tmp.size, tmp.sha256_hex)
            finally:
                os.close(fd)
        except (DeliveryError, OSError) as exc:
            tmp.abort()
            if isinstance(exc, OSError):
                raise os_error("read", shown, exc) from exc
            raise
        if not same:
            tmp.abort()
            raise DeliveryConflict(
                f"{shown} already exists with different content "
                f"(new copy: {tmp.size} bytes, sha256 {tmp.sha256_hex}); not overwritten",
                shown,
            )
        tmp.mark_delivered()

    def sync_new(self) -> None:
        """fsync the ``new/`` directory, making the links of :meth:`deliver` durable.

        The durability order, in full::

            write -> fsync file -> close      (TmpMessage.finish)
            -> link tmp/F to new/F            (Maildir.deliver)
            -> fsync new/                     (this method; once per batch is enough)
            -> (caller) commit "delivered" in the ledger
            -> (caller) DELE, never before that commit

        fsync(2): fsync on a file does not make its directory entry durable;
        the directory needs its own fsync.

        Raises DeliveryError if the fsync fails; the caller must then not
        record the batch as delivered (a retried fsync may lie).
        """
        try:
            os.fsync(self._fd("new"))
        except OSError as exc:
            raise os_error("fsync", self.path / "new", exc) from exc

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
                        index.add(entry.name.split(self.info_sep, 1)[0], f"{sub}/{entry.name}")
            except OSError as exc:
                raise os_error("read", self.path / sub, exc) from exc
        return index

    def find(self, name: str) -> Path | None:
        """The delivered file for *name*: ``new/<name>``, ``cur/<name>`` or ``cur/<name><sep>*``.

        Costs a scan of cur/ when the name is not in new/ or exactly in cur/;
        use :meth:`snapshot` for many lookups. Raises DeliveryError if cur/
        cannot be read; ValueError for an unsafe name.
        """
        check_name(name, self.info_sep)
        if is_regular(self._fd("new"), name):
            return self.path / "new" / name
        in_cur = self._find_in_cur(name)
        return self.path / "cur" / in_cur if in_cur is not None else None

    def _find_in_cur(self, name: str) -> str | None:
        cur = self._fd("cur")
        if is_regular(cur, name):
            return name
        prefix = name + self.info_sep
        try:
            with os.scandir(cur) as entries:
                for entry in entries:
                    if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False):
                        return entry.name
        except OSError as exc:
            raise os_error("read", self.path / "cur", exc) from exc
        return None

    # --------------------------------------------------------- housekeeping

    def sweep_tmp(self, max_age: float = 3600) -> int:
        """Remove popsync's own stale files from ``tmp/``; return how many.

        A file is removed only if its name has the exact shape of
        ``unique_name``, it is a regular file (symlinks are never followed
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
                    if not is_our_name(entry.name):
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
            raise os_error("read", self.path / "tmp", exc) from exc
        return removed

    def filesystem_type(self) -> str | None:
        """The file system type of ``new/`` (e.g. ``ext4``, ``nfs4``); None if unknown.

        Best effort, Linux only (see :mod:`popsync.deliver.maildir.mounts`).
        """
        return filesystem_type(self._fd("new"), self.path / "new")

    def is_on_nfs(self) -> bool:
        """True if the Maildir is on a network file system (nfs, nfs4, cifs, smb3, sshfs ...).

        Best effort, so the sync can warn: link() may lie there, and every host
        delivering needs its own host name.
        """
        return self.filesystem_type() in NETWORK_FS_TYPES
