"""The Maildir as a delivery target (:class:`popsync.deliver.base.Target`).

Drafts are :class:`~popsync.deliver.maildir.tmp.TmpMessage` files in
``tmp/``, created ahead and fsynced on a thread pool
(:class:`~popsync.deliver.maildir.pipeline.DeliveryPipeline`).  A commit
waits for their fsyncs, links each into ``new/`` and fsyncs ``new/`` once:
after it returns the whole batch survives a power loss (fsync(2): a file's
fsync does not make its directory entry durable; the directory needs its
own).  Many messages share one commit, so the journal groups their writes.

Recovery looks names up in ``new/`` and ``cur/`` (a reader may have moved
the file and appended flags), first by the exact name, then by the hash
part of popsync's names, which survives a changed host name or timestamp.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from popsync import failpoints
from popsync.deliver.base import Draft, Held, Pending, Receipt, Refusal
from popsync.deliver.maildir.errors import os_error
from popsync.deliver.maildir.files import open_regular
from popsync.deliver.maildir.names import name_hash
from popsync.deliver.maildir.pipeline import DeliveryPipeline
from popsync.deliver.maildir.store import Maildir
from popsync.deliver.maildir.tmp import TmpMessage
from popsync.errors import DeliveryError
from popsync.identity import HEADER_CAP

#: Messages one commit may cover (one fsync of ``new/`` and one ledger commit).
BATCH = 64

_READ_CHUNK = 1 << 20


class MaildirTarget:
    """One poll's deliveries into one Maildir."""

    kind = "maildir"
    batch = BATCH
    exactly_once = True

    def __init__(self, maildir: Maildir) -> None:
        self.maildir = maildir
        self.pipeline = DeliveryPipeline(maildir)

    def reserve(self, name: str) -> None:
        self.pipeline.reserve(name)  # tmp/<name> is created meanwhile

    def begin(self, name: str, uid: bytes) -> TmpMessage:
        return self.pipeline.open(name)

    def end(self, draft: Draft) -> None:
        assert isinstance(draft, TmpMessage)
        self.pipeline.finish(draft)  # flush + fsync + close, in the background

    def intent(self, draft: Draft) -> None:
        return None  # the name alone finds the file again

    def commit(self, drafts: Sequence[Draft]) -> list[Receipt | Refusal]:
        """fsync every file (waited for), link each into ``new/``, fsync ``new/``.

        Raises DeliveryError; then nothing of the batch counts as delivered
        (files already linked are found by the next poll's recovery).
        """
        finished = self.pipeline.complete()  # raises if any fsync failed: nothing linked
        if finished != list(drafts):
            raise DeliveryError("Maildir batch out of step with the files finished")
        failpoints.failpoint("after_tmp_fsync")
        for tmp in finished:
            self.maildir.deliver(tmp)
        failpoints.failpoint("after_link")
        self.maildir.sync_new()
        return [Receipt(tmp.name) for tmp in finished]

    def recover(self, pending: Sequence[Pending]) -> list[Held]:
        if not pending:
            return []
        index = self.maildir.snapshot()
        held = []
        for item in pending:
            path = index.find(item.name) or index.find_hash(name_hash(item.name))
            if path is not None:
                base = path.name.split(self.maildir.info_sep, 1)[0]
                held.append(measure(path, asked=item.name, name=base))
        if held:
            self.maildir.sync_new()  # a crashed run may not have fsynced new/
        return held

    def close(self) -> None:
        self.pipeline.close()


@contextmanager
def open_maildir_target(
    path: Path, warn: Callable[[str], None], *, parents: bool = False
) -> Iterator[MaildirTarget]:
    """Open (creating if needed) the Maildir at *path* as a target for one poll;
    its missing parent directories are made only with *parents*.

    Sweeps popsync's own stale files from ``tmp/`` and warns when the Maildir
    is on a network file system.  Raises DeliveryError (``UnsafeMaildir`` for
    one that other users could write).
    """
    with Maildir(path, parents=parents) as maildir:
        maildir.sweep_tmp()
        if maildir.is_on_nfs():
            warn("the Maildir is on a network file system; see README")
        target = MaildirTarget(maildir)
        try:
            yield target
        finally:
            target.close()


def measure(path: Path, *, asked: str, name: str) -> Held:
    """Size, SHA-256, wire size and header section of a delivered file.

    Opened as :func:`~popsync.deliver.maildir.files.open_regular` opens
    files: no symlink followed, only a regular file (a FIFO planted under a
    message name must not hang a poll).  Raises DeliveryError.
    """
    fd = open_regular(os.fspath(path), None, path)
    with os.fdopen(fd, "rb") as f:
        mtime = os.fstat(f.fileno()).st_mtime
        digest = hashlib.sha256()
        size = lines = 0
        head = bytearray()
        try:
            while chunk := f.read(_READ_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                lines += chunk.count(b"\n")
                if len(head) <= HEADER_CAP:
                    head += chunk[: HEADER_CAP + 1 - len(head)]
        except OSError as exc:
            raise os_error("read", path, exc) from exc
    end = head.find(b"\n\n")
    section = bytes(head[: end + 2]) if end >= 0 else bytes(head)
    return Held(
        asked=asked,
        name=name,
        size=size,
        sha256=digest.hexdigest(),
        wire_size=size + lines,  # each stored LF was a CRLF on the wire
        header_section=section,
        delivered_at=mtime,
        receipt=name,
    )
