"""How long a server may take over one reply: the progress rule the session enforces.

A POP3 reply is a status line and, for CAPA, LIST, UIDL, RETR and TOP after
``+OK``, a multi-line listing or body (RFC 1939 §3).  A per-read timeout alone
lets a server hold popsync forever by sending a byte every few seconds, so
the session keeps a :class:`ReplyClock` and, before each read, asks it for the
moment that read must be over:

* a status line (the greeting too) must be complete within ``timeout``
  seconds of when the session began waiting for it;
* a listing or a body gets a grace of ``timeout`` seconds, then must keep an
  average of ``min_rate`` bytes per second: after ``t`` seconds at least
  ``(t - timeout) * min_rate`` bytes must have arrived.  A body of S bytes
  may so take ``timeout + S / min_rate`` seconds, and a server trickling
  slower than ``min_rate`` is cut off soon after ``timeout`` seconds.

Only time spent waiting for the server counts: the clock is paused while the
caller works between two pieces of a body (writing, fsyncing), so a slow disk
never looks like a slow server.  The transport's per-read ``timeout`` and the
session's overall deadline apply as well; this clock only adds a limit.

Pure bookkeeping over an injectable clock: no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["ReplyClock"]


class ReplyClock:
    """The progress rule for the piece of a reply the session is waiting for."""

    def __init__(
        self,
        timeout: float,
        min_rate: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Raises ValueError unless *timeout* and *min_rate* are positive."""
        if not timeout > 0 or not min_rate > 0:
            raise ValueError("timeout and min_rate must be more than 0")
        self.timeout = timeout
        self.min_rate = min_rate
        self._clock = clock
        self._what: str | None = None  # None: not waiting
        self._stream = False
        self._start = 0.0
        self._bytes = 0
        self._paused_at: float | None = None

    @property
    def running(self) -> bool:
        """Whether a wait is in progress (begun, not yet :meth:`done`)."""
        return self._what is not None

    def begin(self, what: str, *, stream: bool) -> None:
        """Start waiting for *what* ("the greeting", "RETR 3"): a listing or body
        when *stream*, else a status line."""
        self._what = what
        self._stream = stream
        self._start = self._clock()
        self._bytes = 0
        self._paused_at = None

    def received(self, n: int) -> None:
        """*n* more bytes of it arrived."""
        self._bytes += n

    def pause(self) -> None:
        """The caller has a piece to work on; its time does not count."""
        if self._what is not None and self._paused_at is None:
            self._paused_at = self._clock()

    def resume(self) -> None:
        """The caller waits for the server again."""
        if self._paused_at is not None:
            self._start += self._clock() - self._paused_at
            self._paused_at = None

    def done(self) -> None:
        """The piece is complete; the next wait starts afresh."""
        self._what = None
        self._paused_at = None

    def until(self) -> float:
        """The moment (on the clock) by which the next read must have returned."""
        if not self._stream:
            return self._start + self.timeout
        return self._start + self.timeout + self._bytes / self.min_rate

    def too_slow(self) -> str:
        """Why the wait failed, naming what was slow: ``server sent RETR 3 too
        slowly (420 bytes in 61.2 s; min_rate 1024 bytes/s)``."""
        elapsed = (self._paused_at or self._clock()) - self._start
        rule = (
            f"min_rate {self.min_rate:.10g} bytes/s"
            if self._stream
            else f"timeout {self.timeout:.10g} s"
        )
        return (
            f"server sent {self._what or 'a reply'} too slowly "
            f"({self._bytes} bytes in {elapsed:.1f} s; {rule})"
        )
