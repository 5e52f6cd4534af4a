"""Locking an mbox the way Dovecot and mutt do: a dotlock, then fcntl.

Writers of one mbox must agree on a lock, and the mail programs that share
a user's mbox use two at once (Dovecot's default ``mbox_write_locks =
dotlock fcntl``, mutt's defaults):

1. the **dotlock** ``PATH.lock``, created with ``O_EXCL`` and holding
   ``pid:host``.  It is stale, and removed, when its process is gone (same
   host) or when it and the mbox are both older than *stale_after* seconds
   (Dovecot's ``mbox_dotlock_change_timeout``: a holder that makes no
   progress for that long is dead or stuck).  Creating it needs write access
   to the mbox's directory; without that popsync goes on with fcntl alone
   and warns once;
2. a POSIX **fcntl** write lock on the whole mbox.

Both are waited for up to *wait* seconds, then :class:`MboxBusy` (a
temporary :class:`~popsync.errors.DeliveryError`) is raised.  POSIX locks
belong to a process, not a thread, so two daemon threads delivering into
one mbox are kept apart by a lock of this process as well.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from popsync.errors import DeliveryError

#: Longest wait for another program's lock.
LOCK_WAIT = 30.0
#: A dotlock this old, on an mbox unchanged as long, is overridden (seconds).
STALE_AFTER = 300.0

_HOST = socket.gethostname()
_RETRY_FIRST, _RETRY_MAX = 0.01, 0.25
_NO_DOTLOCK = (errno.EACCES, errno.EPERM, errno.EROFS)

#: This process's own lock per mbox (fcntl cannot tell our threads apart).
_threads: dict[str, threading.Lock] = {}
_threads_guard = threading.Lock()
#: Mboxes already warned about: the dotlock cannot be created there.
_warned: set[str] = set()


class MboxBusy(DeliveryError):
    """Another program held the mbox's lock for longer than the wait."""


class MboxLock:
    """The write lock of one mbox; :meth:`acquire` returns its open descriptor."""

    def __init__(
        self, path: Path, *, wait: float, stale_after: float, warn: Callable[[str], None]
    ) -> None:
        self.path = path
        self.dotlock = path.with_name(path.name + ".lock")
        self.wait = wait
        self.stale_after = stale_after
        self._warn = warn
        self._key = os.path.abspath(path)
        self._fd: int | None = None
        self._dotlock_id: tuple[int, int] | None = None
        self._thread_lock: threading.Lock | None = None
        #: True when acquire created the mbox (its directory needs an fsync).
        self.created = False

    def acquire(self) -> int:
        """Lock the mbox (creating it, mode 0600, if missing) and return a
        descriptor open for appending.  Raises MboxBusy or DeliveryError."""
        deadline = time.monotonic() + self.wait
        self._thread_lock = _thread_lock(self._key)
        if not self._thread_lock.acquire(timeout=max(self.wait, 0.0)):
            self._thread_lock = None
            raise MboxBusy(f"mbox {self.path}: another poll of this popsync is writing it")
        try:
            self._take_dotlock(deadline)
            self._fd = self._open()
            self._take_fcntl(self._fd, deadline)
        except BaseException:
            self.release()
            raise
        return self._fd

    def release(self) -> None:
        """Drop both locks (closing the descriptor).  Never raises."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # also drops the fcntl lock
            self._fd = None
        if self._dotlock_id is not None:
            with contextlib.suppress(OSError):
                info = os.lstat(self.dotlock)
                if (info.st_dev, info.st_ino) == self._dotlock_id:
                    os.unlink(self.dotlock)
            self._dotlock_id = None
        if self._thread_lock is not None:
            self._thread_lock.release()
            self._thread_lock = None

    # -- the dotlock ------------------------------------------------------------

    def _take_dotlock(self, deadline: float) -> None:
        pause = _RETRY_FIRST
        while True:
            try:
                fd = os.open(
                    self.dotlock,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                )
            except FileExistsError:
                if self._override_stale():
                    continue
                if time.monotonic() >= deadline:
                    raise MboxBusy(
                        f"mbox {self.path}: locked by another program "
                        f"({self.dotlock} held by {self._holder() or 'an unknown process'}); "
                        "will try again"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, _RETRY_MAX)
                continue
            except OSError as exc:
                if exc.errno in _NO_DOTLOCK:
                    self._warn_no_dotlock(exc)
                    return
                raise DeliveryError(
                    f"mbox {self.path}: cannot create {self.dotlock}: {exc.strerror}"
                ) from None
            try:
                os.write(fd, f"{os.getpid()}:{_HOST}".encode())
                info = os.fstat(fd)
            finally:
                os.close(fd)
            self._dotlock_id = (info.st_dev, info.st_ino)
            return

    def _warn_no_dotlock(self, exc: OSError) -> None:
        if self._key in _warned:
            return
        _warned.add(self._key)
        self._warn(
            f"mbox {self.path}: cannot create the dotlock {self.dotlock} ({exc.strerror}); "
            "locking with fcntl only, which mail programs that use only dotlocks do not see"
        )

    def _holder(self) -> str:
        try:
            fd = os.open(self.dotlock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return ""
        try:
            raw = os.read(fd, 128)
        except OSError:
            raw = b""
        finally:
            os.close(fd)
        text = raw.decode("ascii", "replace").strip()
        return text if text.replace(":", "").replace(".", "").replace("-", "").isalnum() else ""

    def _override_stale(self) -> bool:
        """Remove the dotlock if it is stale (see the module docstring)."""
        try:
            info = os.lstat(self.dotlock)
        except FileNotFoundError:
            return True  # released meanwhile: try again at once
        except OSError:
            return False
        if not (self._holder_gone() or self._too_old(info.st_mtime)):
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dotlock)
        return True

    def _holder_gone(self) -> bool:
        pid_text, _, host = self._holder().partition(":")
        if not pid_text.isdigit() or host not in ("", _HOST):
            return False
        pid = int(pid_text)
        if pid == os.getpid():
            return True  # ours, left by an earlier process (threads hold the process lock)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False  # alive, another user's
        return False

    def _too_old(self, lock_mtime: float) -> bool:
        now = time.time()
        try:
            mbox_mtime = os.stat(self.path).st_mtime
        except OSError:
            mbox_mtime = 0.0
        return now - lock_mtime > self.stale_after and now - mbox_mtime > self.stale_after

    # -- the mbox and its fcntl lock ---------------------------------------------------

    def _open(self) -> int:
        # O_NONBLOCK: a FIFO planted at the path must not hang the poll.
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                self.created = True
            except FileExistsError:
                fd = os.open(self.path, flags)
        except OSError as exc:
            raise DeliveryError(f"mbox {self.path}: cannot open: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise DeliveryError(f"mbox {self.path}: not a regular file")
        os.set_blocking(fd, True)
        return fd

    def _take_fcntl(self, fd: int, deadline: float) -> None:
        pause = _RETRY_FIRST
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise DeliveryError(f"mbox {self.path}: cannot lock: {exc.strerror}") from None
            if time.monotonic() >= deadline:
                raise MboxBusy(
                    f"mbox {self.path}: another program holds its fcntl lock; will try again"
                )
            time.sleep(pause)
            pause = min(pause * 2, _RETRY_MAX)


def _thread_lock(key: str) -> threading.Lock:
    with _threads_guard:
        return _threads.setdefault(key, threading.Lock())
