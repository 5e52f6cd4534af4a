"""Hash and write a message's chunks on a worker thread, in order, boundedly.

Receiving a large message is per-byte work on one thread: decrypting,
turning CRLF into LF, unstuffing dots, then SHA-256 and ``write()`` of the
result.  The last two release the GIL for large buffers, so on a machine
with a second core they can run while the poll's thread receives and
decodes the next chunk.  :class:`WriteBehind` runs them there:

* **in order**: one worker thread per executor (the executor must have
  exactly one), so chunks are hashed and written as they were handed in;
* **bounded**: at most ``depth`` chunks are queued or in progress; the
  caller waits for the oldest before handing in another, so memory stays a
  few receive chunks whatever the message size;
* **errors on the caller's side**: the first exception the work raises is
  kept, every later chunk is skipped, and :meth:`check` or :meth:`drain`
  raises it on the thread that asks.  The work itself never cleans up: the
  owner does, after :meth:`drain`, on its own thread.

Chunks must be immutable (``bytes``): the caller may reuse nothing it
handed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future

__all__ = ["DEPTH", "WriteBehind"]

#: Chunks handed in and not yet done, at most (each at most one receive).
DEPTH = 4


class WriteBehind:
    """Ordered, bounded background calls of *work* for one message.

    :meth:`submit` is for one thread (the writer's); :meth:`drain` and
    :meth:`wait` may be called from any thread once the writer has stopped
    submitting (a finishing thread, the writer itself).
    """

    __slots__ = ("_depth", "_error", "_executor", "_pending", "_tail", "_work")

    def __init__(
        self, executor: Executor, work: Callable[[bytes], None], *, depth: int = DEPTH
    ) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self._executor = executor
        self._work = work
        self._depth = depth
        self._pending: deque[Future[None]] = deque()
        self._tail: Future[None] | None = None
        self._error: BaseException | None = None

    def submit(self, chunk: bytes) -> None:
        """Queue *chunk* for *work*, first waiting while ``depth`` chunks are queued.

        Raises the work's first error instead, if there was one.
        """
        self.check()
        pending = self._pending
        while len(pending) >= self._depth:
            pending.popleft().result()  # _run never raises: errors are kept
            self.check()
        while pending and pending[0].done():
            pending.popleft()
        future = self._executor.submit(self._run, chunk)
        pending.append(future)
        self._tail = future

    def check(self) -> None:
        """Raise the work's first error, if any has happened yet."""
        if self._error is not None:
            raise self._error

    def wait(self) -> None:
        """Wait until every chunk submitted so far is done; never raises."""
        tail = self._tail
        if tail is not None:
            tail.result()  # the executor's one thread runs chunks in order

    def drain(self) -> None:
        """:meth:`wait`, then :meth:`check`."""
        self.wait()
        self.check()

    def _run(self, chunk: bytes) -> None:
        if self._error is not None:
            return  # the message is lost already; keep the first error
        try:
            self._work(chunk)
        except BaseException as exc:  # handed to the caller's thread by check()
            self._error = exc
