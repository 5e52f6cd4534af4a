"""A draft that spools a message body to an unnamed temporary file.

Targets that deliver a whole message at once (an mbox append, an MDA's
stdin, LMTP DATA, IMAP APPEND) cannot start before the body is complete and
trusted -- the server's next reply must show it whole -- so the body is
written here as it streams, then read back in chunks when the target
delivers it.  Memory stays bounded by the chunk size for any message size.

The file is created with ``O_TMPFILE`` where the file system supports it
(Linux), else created under a random name and unlinked at once: it never has
a name another process could open, and it disappears with the descriptor,
even after a SIGKILL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

from popsync.errors import DeliveryError

#: Chunk size for reading a spooled body back.
READ_CHUNK = 256 * 1024


class SpoolDraft:
    """One message body in an unnamed temporary file (see the module docstring).

    Implements :class:`popsync.deliver.base.Draft`; :meth:`chunks` and
    :meth:`fileno` give the body back for delivery.
    """

    def __init__(self, name: str, directory: Path | None = None) -> None:
        self._name = name
        self._hash = hashlib.sha256()
        self._size = 0
        self._fd: int | None = _anonymous_file(directory or Path(tempfile.gettempdir()))

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return self._size

    @property
    def sha256_hex(self) -> str:
        return self._hash.hexdigest()

    def write(self, data: bytes) -> None:
        fd = self._require()
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            raise DeliveryError(f"cannot spool a message: {exc.strerror}") from None
        self._hash.update(data)
        self._size += len(data)

    def chunks(self, size: int = READ_CHUNK) -> Iterator[bytes]:
        """The body from its start, in chunks of at most *size* bytes."""
        fd = self._require()
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := os.read(fd, size):
            yield chunk

    def head(self, size: int) -> bytes:
        """The first *size* bytes (for headers such as Return-Path or Message-ID)."""
        fd = self._require()
        return os.pread(fd, size, 0)

    def fileno(self) -> int:
        """The descriptor, positioned nowhere in particular (use ``os.pread``)."""
        return self._require()

    def abort(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    close = abort

    def _require(self) -> int:
        if self._fd is None:
            raise DeliveryError(f"message {self._name}: its spool file is closed")
        return self._fd

    def __del__(self) -> None:
        self.abort()


def _anonymous_file(directory: Path) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile:
        with contextlib.suppress(OSError):  # not every file system has it
            return os.open(directory, flags | tmpfile, 0o600)
    path = directory / f".popsync-spool-{secrets.token_hex(8)}"
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise DeliveryError(f"cannot create a spool file in {directory}: {exc.strerror}") from None
    os.unlink(path)
    return fd
