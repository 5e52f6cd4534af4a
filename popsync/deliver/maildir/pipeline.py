"""Overlap the slow file-system calls of Maildir delivery with the network.

Creating a file in ``tmp/`` and fsyncing it are the two calls that block:
on ext4 both wait for the journal, a millisecond or more each, while the
Python work per message is a tenth of that.  Done inline they serialise a
whole poll on the disk.  :class:`DeliveryPipeline` runs them on a small
thread pool instead:

* :meth:`reserve` creates ``tmp/<name>`` ahead of time, as the RETR for it
  is sent, so the file is ready when the body starts to arrive;
* the body still streams into the file on the caller's thread (never held
  whole in memory);
* :meth:`finish` flushes, fsyncs and closes in the background, several at
  once, which lets the file system group their journal commits;
* :meth:`complete` waits until every finished file is durable.

The order that makes delivery safe is unchanged and stays with the caller:
a file is ``link()``ed into ``new/`` only after :meth:`complete` reported
its fsync done, ``new/`` is fsynced after the links, the ledger commits
after that, and DELE comes last.  Every error surfaces as the
:class:`DeliveryError` the Maildir raised, on the caller's thread.

Contract: for each message, :meth:`reserve` (optional) -> :meth:`open` ->
writes -> :meth:`finish`; then :meth:`complete` for the batch.
:meth:`complete` either returns every finished file, durable and ready to
link, or raises the first error and discards them all, so a batch is linked
whole or not at all.  :meth:`close` never raises and removes whatever was
reserved or finished but not handed out by :meth:`complete`.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from popsync.deliver.maildir.store import Maildir
from popsync.deliver.maildir.tmp import TmpMessage

#: Threads doing creates and fsyncs; enough for the journal to batch them.
WORKERS = 8

_T = TypeVar("_T")

__all__ = ["WORKERS", "DeliveryPipeline"]


class DeliveryPipeline:
    """Background creation and fsync of tmp files for one Maildir; one poll's use.

    Not thread-safe itself: call it from one thread (the poll's).
    """

    def __init__(self, maildir: Maildir, *, workers: int = WORKERS) -> None:
        self._maildir = maildir
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="popsync-io")
        self._reserved: dict[str, Future[TmpMessage]] = {}
        self._finishing: list[tuple[TmpMessage, Future[None]]] = []

    def reserve(self, name: str) -> None:
        """Start creating ``tmp/<name>`` (see :meth:`Maildir.open_tmp`)."""
        if name not in self._reserved:
            self._reserved[name] = self._pool.submit(self._maildir.open_tmp, name)

    def open(self, name: str) -> TmpMessage:
        """The tmp file for *name*, reserved earlier or created now.

        Raises DeliveryError as :meth:`Maildir.open_tmp` does.
        """
        future = self._reserved.pop(name, None)
        if future is None:
            return self._maildir.open_tmp(name)
        return future.result()

    def finish(self, tmp: TmpMessage) -> None:
        """Flush, fsync and close *tmp* in the background; see :meth:`complete`."""
        self._finishing.append((tmp, self._pool.submit(tmp.finish)))

    def complete(self) -> list[TmpMessage]:
        """Wait for every :meth:`finish` so far; return those files, in order.

        Each returned file is fsynced and closed, ready to be linked.  If any
        failed, all of them are discarded (never linked) and the first error
        is raised: DeliveryError.
        """
        finishing, self._finishing = self._finishing, []
        first: BaseException | None = None
        for _, future in finishing:
            error = _wait(future)
            if error is not None and first is None:
                first = error
        if first is not None:
            for tmp, _ in finishing:
                tmp.abort()
            raise first
        return [tmp for tmp, _ in finishing]

    def close(self) -> None:
        """Discard what was reserved but not used, wait for the workers, stop.

        Files still being finished are waited for but not linked: a caller
        that wants them must call :meth:`complete` first.  Never raises.
        """
        for reserved in self._reserved.values():
            if not reserved.cancel():
                unused = _result_or_none(reserved)
                if unused is not None:
                    unused.abort()
        self._reserved.clear()
        for tmp, finishing in self._finishing:
            _wait(finishing)
            tmp.abort()
        self._finishing.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> DeliveryPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait(future: Future[_T]) -> BaseException | None:
    """Wait for *future*; return its exception (DeliveryError or a bug) or None."""
    try:
        future.result()
    except BaseException as exc:
        return exc
    return None


def _result_or_none(future: Future[TmpMessage]) -> TmpMessage | None:
    """The file a reservation created, or None if creating it failed.

    Any failure counts (a DeliveryError, or the ValueError of an unsafe
    name): the caller never opened this file, so its error is nobody's to
    handle, and :meth:`DeliveryPipeline.close` must not raise.
    """
    try:
        return future.result()
    except Exception:
        return None
