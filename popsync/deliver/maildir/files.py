"""Opening and reading Maildir files without following links or blocking.

Everything here works relative to directory descriptors where it can and
opens with ``O_NOFOLLOW`` (open(2)): a symlink planted under a message name
is refused, never followed. Reads open with ``O_NONBLOCK`` and accept only
regular files, so a FIFO planted under a message name cannot hang a poll.
Files popsync creates get mode 0600 and directories 0700 (the getmail
CVE-2004-0880 lesson: a world-readable tmp file leaks mail).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path

from popsync.deliver.maildir.errors import os_error
from popsync.errors import DeliveryError

__all__ = [
    "DIR_FLAGS",
    "DIR_MODE",
    "FILE_MODE",
    "close_quietly",
    "digest_fd",
    "file_digest",
    "is_regular",
    "open_regular",
    "same_file",
]

#: Mode of the directories popsync creates.
DIR_MODE = 0o700
#: Mode of the message files popsync creates.
FILE_MODE = 0o600
#: Flags for opening a directory to work inside it (openat/linkat).
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: Chunk size for reading a file back (digests on recovery).
_READ_CHUNK = 1024 * 1024


def open_regular(name: str, dir_fd: int | None, shown: Path | str) -> int:
    """Open a regular file for reading without following a symlink or blocking on a FIFO.

    *name* is relative to *dir_fd* (or a path when *dir_fd* is None); *shown*
    is the path named in errors. The caller closes the returned descriptor.

    Raises DeliveryError if it cannot be opened or is not a regular file.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        raise os_error("open", shown, exc) from exc
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise os_error("stat", shown, exc) from exc
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DeliveryError(f"{shown} is not a regular file")
    return fd


def digest_fd(fd: int, shown: Path | str) -> tuple[int, str]:
    """(size, SHA-256 hex) of an open file, read in 1 MiB chunks (memory stays flat).

    Reads from the descriptor's current offset; does not close it. Raises
    DeliveryError naming *shown* if a read fails.
    """
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
        raise os_error("read", shown, exc) from exc
    return size, digest.hexdigest()


def file_digest(path: Path | str) -> tuple[int, str]:
    """Return (size, SHA-256 hex) of a delivered file, for recovery and verification.

    Reads in 1 MiB chunks. Refuses symlinks and anything but a regular file
    (a FIFO planted under a message name must not hang a poll).

    Raises DeliveryError if the file cannot be opened or read.
    """
    fd = open_regular(os.fspath(path), None, path)
    try:
        return digest_fd(fd, path)
    finally:
        os.close(fd)


def is_regular(dir_fd: int, name: str) -> bool:
    """Whether *name* in *dir_fd* is a regular file (a symlink is not). Never raises."""
    try:
        return stat.S_ISREG(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def same_file(dir_fd: int, name: str, ident: tuple[int, int]) -> bool:
    """Whether *name* in *dir_fd* is the inode *ident* = (st_dev, st_ino). Never raises."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == ident


def close_quietly(fd: int) -> None:
    """close(2) *fd*, ignoring errors: for paths where the file is discarded anyway."""
    with contextlib.suppress(OSError):
        os.close(fd)
