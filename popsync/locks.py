"""Per-account locks, so two popsync processes never poll one account at once.

This is the lock of a SQLite ledger (one host); a PostgreSQL ledger, shared
by hosts, locks accounts in the database instead (:mod:`popsync.ledger.locks`),
and :meth:`popsync.ledger.Ledger.account_lock` picks the right one.

A daemon and a cron ``popsync sync`` (or two daemons) sharing one config would
otherwise fetch the same new messages twice and race each other's DELEs;
getmail's FAQ documents exactly that failure. Each account gets an exclusive
``flock(2)`` on ``<state_dir>/locks/<account>.lock``:

* ``flock`` locks belong to the *open file description*, so they exclude other
  processes and also other threads of this process that open the file
  separately (unlike ``fcntl``/POSIX record locks, which are per process). The
  kernel drops the lock when the holder dies, even by SIGKILL: no stale locks.
* The lock is never taken on the ledger database itself: closing any
  descriptor of a file drops this process's POSIX locks on it, which is how
  SQLite databases get corrupted (sqlite.org/howtocorrupt.html §2.2).
* The directory is created with mode 0700 and the file with 0600, both opened
  with ``O_NOFOLLOW`` (the file relative to the directory's descriptor), so a
  planted symlink cannot make popsync create or truncate a file elsewhere.
* The lock file is never deleted (deleting a lock file lets a waiter lock the
  unlinked inode while a newcomer locks a fresh one). It holds the pid of the
  current holder, for the error message only.
* Waiting for a bounded time polls with ``LOCK_NB`` (``flock`` has no timeout,
  and popsync uses no signals or alarms for time limits).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from popsync.config.values import account_name_problem
from popsync.errors import ConfigError, PopsyncError

__all__ = ["AccountBusy", "account_lock"]

# Polling interval bounds while waiting for a held lock (seconds).
_POLL_FIRST: Final = 0.005
_POLL_MAX: Final = 0.1

_MAX_PID_TEXT: Final = 32


class AccountBusy(PopsyncError):
    """Another popsync process (or thread) is polling this account right now."""

    temporary = True

    def __init__(self, account: str, holder: int | None, *, host: str | None = None) -> None:
        self.account = account
        self.holder = holder
        #: The holder's host, when the lock is shared between hosts (PostgreSQL).
        self.host = host
        who = f"process {holder}" if holder is not None else "another popsync"
        where = f" on {host}" if host is not None and holder is not None else ""
        super().__init__(f"account {account}: {who}{where} is polling it already")


def _open_lock_file(state_dir: Path, account: str, folder: str) -> int:
    locks = state_dir / folder
    locks.mkdir(mode=0o700, parents=True, exist_ok=True)
    dir_fd = os.open(locks, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(f"{account}.lock", flags, 0o600, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


def _read_holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, _MAX_PID_TEXT, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _acquire(fd: int, wait: bool | float) -> bool:
    if wait is True:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    if _try_lock(fd):
        return True
    budget = 0.0 if wait is False else float(wait)
    deadline = time.monotonic() + budget
    pause = _POLL_FIRST
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(pause, left))
        if _try_lock(fd):
            return True
        pause = min(pause * 2, _POLL_MAX)
    return False


@contextmanager
def account_lock(
    state_dir: Path, account: str, *, wait: bool | float, folder: str = "locks"
) -> Iterator[None]:
    """Hold the exclusive lock of *account* for the duration of the ``with`` block.

    *wait*: ``False`` fails at once if the lock is held; ``True`` waits as long
    as it takes; a number waits up to that many seconds.  *folder*: the
    directory under *state_dir* that holds the lock file; another folder is
    another lock of the same account (``oauth`` guards its token store).

    Raises:
        AccountBusy: the lock is held elsewhere (after waiting, if asked to).
        ConfigError: *account* is not a valid account name (it would not make
            a safe file name).  The config refuses such names first; this is
            the same rule, checked again because the name becomes a path.
        PopsyncError: the lock directory or file cannot be created or opened
            (for example a symlink where the lock file should be).
    """
    problem = account_name_problem(account)
    if problem is not None:
        raise ConfigError(f"account name {account!r} cannot name a lock file: it {problem}")
    try:
        fd = _open_lock_file(state_dir, account, folder)
    except OSError as exc:
        raise PopsyncError(
            f"account {account}: cannot open its lock file in {state_dir / folder}: "
            f"{exc.strerror or exc}"
        ) from exc
    try:
        try:
            acquired = _acquire(fd, wait)
        except OSError as exc:
            raise PopsyncError(f"account {account}: cannot lock: {exc.strerror}") from exc
        if not acquired:
            raise AccountBusy(account, _read_holder(fd))
        try:
            # For the message a waiting process shows; not part of the lock.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            pass  # a full disk must not stop the poll: the lock itself is held
        yield
    finally:
        # Closing the descriptor releases the flock (it is our only reference
        # to this open file description: O_CLOEXEC keeps it from children).
        os.close(fd)
