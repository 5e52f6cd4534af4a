"""One message being written into a Maildir's ``tmp/``, up to its link into ``new/``.

Contract
--------
:meth:`TmpMessage.write` streams the bytes into ``tmp/<name>`` exactly as
given (no line-ending conversion here) with bounded memory;
:meth:`TmpMessage.finish` does the first three steps of the durability
order::

    write -> fsync file -> close -> link into new/ -> fsync new/

and :meth:`TmpMessage.link_into` the link. fsync(2) comes before close(2)
because close() may report a deferred write error (NFS) but never flushes.

* **Nothing half-written is ever linked.** Any ``OSError`` while writing,
  fsyncing or closing discards the tmp file: after a failed fsync, a retried
  fsync may report success for data the kernel already dropped (on Linux a
  failed writeback leaves the pages marked clean; see fsync(2)), so the only
  safe answer is to fetch the message again later.
* **Only the file written is ever linked.** Before linking,
  ``tmp/<name>`` must still be that file: same device and inode, a regular
  file with exactly one link. Where /proc is available the link is then made
  from a descriptor kept on the file since :meth:`~TmpMessage.finish`
  (``linkat`` with ``AT_SYMLINK_FOLLOW`` on ``/proc/self/fd/N`` links the
  inode itself, see linkat(2) and proc(5)), so a swap of ``tmp/<name>``
  after the check links nothing else either.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import stat
import weakref
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from popsync.deliver.maildir.errors import os_error
from popsync.deliver.maildir.files import close_quietly, same_file
from popsync.errors import DeliveryError

__all__ = ["TmpMessage", "TmpOwner"]

#: Where a descriptor can be named to link() the very file it refers to (Linux).
_PROC_FD = "/proc/self/fd"
#: Small writes are gathered up to this size before one os.write(); larger
#: writes bypass the buffer. Bounds the memory of an open message.
_WRITE_BUFFER = 256 * 1024


class TmpOwner(Protocol):
    """What a :class:`TmpMessage` needs of the Maildir that created it."""

    @property
    def path(self) -> Path:
        """The Maildir's root directory."""
        ...

    def unlink_tmp(self, name: str) -> None:
        """Remove ``tmp/<name>``; best effort, never raises."""
        ...


class _State(Enum):
    OPEN = "open"
    FINISHED = "finished"
    DELIVERED = "delivered"
    DISCARDED = "discarded"


@functools.cache
def _proc_links() -> bool:
    """Whether a file can be linked from its descriptor through /proc/self/fd."""
    return os.path.isdir(_PROC_FD)


class TmpMessage:
    """A message being written into ``tmp/``; create with ``Maildir.open_tmp``.

    Use as a context manager: leaving the block without a successful
    ``Maildir.deliver`` removes the tmp file. Not thread-safe, but
    :meth:`finish` may run on another thread than the writes that preceded it
    (as :class:`~popsync.deliver.maildir.pipeline.DeliveryPipeline` does).
    """

    def __init__(self, owner: TmpOwner, name: str, fd: int, dev: int, ino: int) -> None:
        """Take over *fd*, open for writing on ``tmp/<name>`` of *owner*, inode (*dev*, *ino*)."""
        self._owner = owner
        self.name = name
        self._fd = fd
        self._ident = (dev, ino)
        # After finish(): a second descriptor on the file, to link() exactly
        # this inode into new/ (see link_into); -1 when there is none. Closed
        # on delivery or abort, else when the object is collected (a finished
        # message a failed poll never delivered must not leak it).
        self._link_fd = -1
        self._link_fd_closer: weakref.finalize[[int], TmpMessage] | None = None
        self._buf = bytearray()
        self._sha = hashlib.sha256()
        self._size = 0
        self._state = _State.OPEN

    @property
    def owner(self) -> TmpOwner:
        """The Maildir this message is written into."""
        return self._owner

    @property
    def path(self) -> Path:
        """Where the file is while being written: ``<maildir>/tmp/<name>``."""
        return self._owner.path / "tmp" / self.name

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
        """True between a successful :meth:`finish` and delivery or abort."""
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

        ``fsync=False`` gives up durability and is meant for tests and
        benchmarks only. Where /proc is available a duplicate descriptor is
        kept until delivery, so :meth:`link_into` links this very file.
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
            close_quietly(fd)
            self.abort()
            raise os_error("fsync", self.path, exc) from exc
        if _proc_links():
            with contextlib.suppress(OSError):  # without it, link_into() links by name
                self._link_fd = os.dup(fd)
                self._link_fd_closer = weakref.finalize(self, close_quietly, self._link_fd)
        try:
            # close() can report a deferred write error (NFS): the data is not safe.
            os.close(fd)
        except OSError as exc:
            self.abort()
            raise os_error("close", self.path, exc) from exc
        self._state = _State.FINISHED

    def require_finished(self) -> None:
        """Raise ValueError unless :meth:`finish` succeeded and nothing happened since."""
        self._require(_State.FINISHED)

    def is_at(self, dir_fd: int, name: str) -> bool:
        """Whether *name* in directory *dir_fd* is the very file this message wrote."""
        return same_file(dir_fd, name, self._ident)

    def link_into(self, tmp_dir_fd: int, new_dir_fd: int) -> None:
        """link() the file this message wrote to ``<new_dir_fd>/<name>``.

        *tmp_dir_fd* is the ``tmp/`` directory it was created in. Checks first
        that ``tmp/<name>`` is still that file (device, inode, a regular file
        with one link), then links from the descriptor kept by :meth:`finish`
        through /proc/self/fd, or by name where there is none. Does not change
        the state: the caller calls :meth:`mark_delivered` once the link
        counts.

        Raises DeliveryError if ``tmp/<name>`` cannot be checked, was replaced
        or was linked elsewhere; OSError as link() raises it (FileExistsError
        if the target name is taken).
        """
        try:
            st = os.lstat(self.name, dir_fd=tmp_dir_fd)
        except OSError as exc:
            raise os_error("stat", self.path, exc) from exc
        if (
            (st.st_dev, st.st_ino) != self._ident
            or not stat.S_ISREG(st.st_mode)
            or st.st_nlink != 1
        ):
            raise DeliveryError(
                f"{self.path} was replaced or linked elsewhere after popsync wrote it; "
                f"not delivered (is another program writing into {self.path.parent}?)"
            )
        if self._link_fd >= 0:
            source = f"{_PROC_FD}/{self._link_fd}"
            os.link(source, self.name, dst_dir_fd=new_dir_fd, follow_symlinks=True)
        else:
            os.link(
                self.name,
                self.name,
                src_dir_fd=tmp_dir_fd,
                dst_dir_fd=new_dir_fd,
                follow_symlinks=False,
            )

    def mark_delivered(self) -> None:
        """Record that the message is in new/ or cur/ and drop the tmp entry.

        A tmp entry that cannot be removed is swept later. Never raises.
        """
        self._state = _State.DELIVERED
        self._close_link_fd()
        self._owner.unlink_tmp(self.name)

    def abort(self) -> None:
        """Close and remove the tmp file. Idempotent; a no-op once delivered; never raises."""
        if self._state in (_State.DELIVERED, _State.DISCARDED):
            return
        self._state = _State.DISCARDED
        self._buf = bytearray()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            close_quietly(fd)
        self._close_link_fd()
        self._owner.unlink_tmp(self.name)

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
            raise os_error("write", self.path, exc) from exc

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
