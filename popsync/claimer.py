"""The claim loop of a worker sharing its accounts with others through a PostgreSQL ledger.

One thread per worker (not one per account, and no scheduler job per
account: 10,000 accounts cost 10,000 rows in the database, not 10,000 timers
here). It does two things, and sleeps on one :class:`threading.Event` in
between:

* **Claims** (:meth:`~popsync.ledger.leases.LeaseBook.claim`) up to as many
  due accounts as the worker has free poll slots, every
  :data:`CLAIM_PERIOD` seconds, and at once when a slot frees after a claim
  that filled every slot (more may be due). Each claim is handed to the
  daemon's ``start`` callback, which queues the poll in its bounded pool; a
  claim the daemon does not want (an account its config does not list, or it
  is stopping) is given back, due again after :data:`GIVE_BACK_DELAY`.
* **Renews** the lease of every account it is polling every third of the
  lease. Accounts whose lease was lost (it ran out while this worker was
  stalled, and another took the account) are reported through ``on_lost``,
  and so is every account when renewals have failed for a whole lease (the
  database is out of reach, so others may have taken them): the daemon stops
  those polls at the next message boundary. The per-account advisory lock
  keeps them from overlapping with the newcomer meanwhile.

An idle worker therefore costs one claim statement per :data:`CLAIM_PERIOD`,
whatever the number of accounts.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Final

from popsync.errors import PopsyncError
from popsync.ledger import Ledger
from popsync.ledger.leases import Claim

__all__ = ["CLAIM_PERIOD", "GIVE_BACK_DELAY", "Claimer", "worker_id"]

log = logging.getLogger("popsync.daemon")

#: Seconds between looks for due accounts when nothing wakes the loop sooner.
CLAIM_PERIOD: Final = 1.0
#: A claim given back unpolled is due again this many seconds later.
GIVE_BACK_DELAY: Final = 5.0


def worker_id() -> str:
    """This worker's id in the lease table: ``HOST:PID:RANDOM``.

    Host and pid say where to look; the random part keeps a restarted worker
    that got the same pid from being mistaken for its predecessor (whose
    leases it must not renew).
    """
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:200] or "unknown"
    return f"{host}:{os.getpid()}:{secrets.token_hex(3)}"


class Claimer:
    """Claims due accounts for one worker and renews its leases (see the module docstring).

    *start(claim)* runs in the claimer's thread and must not block: it
    queues the poll and returns True, or returns False to give the claim
    back. The daemon calls :meth:`done` when a poll has been released.
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        owner: str,
        lease: float,
        slots: int,
        start: Callable[[Claim], bool],
        on_lost: Callable[[set[str]], None],
    ) -> None:
        self.owner = owner
        self._ledger = ledger
        self._lease = lease
        self._slots = slots
        self._start = start
        self._on_lost = on_lost
        self._lock = threading.Lock()
        # Accounts this worker polls, each with the number of its claim, so a
        # renewal's answer about an earlier claim never stops a later poll.
        self._busy: dict[str, int] = {}
        self._numbers = itertools.count(1)
        self._filled = False
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="popsync-claimer", daemon=True)
        self._failing = False

    def start(self) -> None:
        """Start the loop's thread."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming and wait (up to *timeout*) for the loop to end.

        Leases of polls still running are no longer renewed from here on;
        their polls are finishing (the daemon's grace period).
        """
        self._stopping.set()
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def busy(self) -> int:
        """How many claimed accounts are being polled."""
        with self._lock:
            return len(self._busy)

    def done(self, name: str) -> None:
        """The poll of *name* has been released: free its slot."""
        with self._lock:
            self._busy.pop(name, None)
            filled = self._filled
        if filled:
            self._wakeup.set()

    # -- the loop ------------------------------------------------------------

    def _run(self) -> None:
        period = self._lease / 3
        renewed = time.monotonic()
        next_renewal = renewed + period
        while not self._stopping.is_set():
            if time.monotonic() >= next_renewal:
                if self._renew():
                    renewed = time.monotonic()
                elif time.monotonic() - renewed >= self._lease:
                    self._lose_all()
                next_renewal = time.monotonic() + period
            self._claim()
            wait = min(CLAIM_PERIOD, max(next_renewal - time.monotonic(), 0.0))
            self._wakeup.wait(wait)
            self._wakeup.clear()

    def _claim(self) -> None:
        with self._lock:
            free = self._slots - len(self._busy)
        if free <= 0 or self._stopping.is_set():
            return
        try:
            claims = self._ledger.claim(self.owner, free, self._lease)
        except PopsyncError as exc:
            self._trouble(f"cannot claim due accounts: {exc}")
            return
        self._recovered()
        with self._lock:
            self._filled = len(claims) == free
        refused = []
        for claim in claims:
            with self._lock:
                self._busy[claim.name] = next(self._numbers)
            if not self._start(claim):
                with self._lock:
                    self._busy.pop(claim.name, None)
                refused.append(claim.name)
        if refused:
            try:
                self._ledger.give_back(self.owner, refused, GIVE_BACK_DELAY)
            except PopsyncError as exc:  # they come back when the lease runs out
                self._trouble(f"cannot give back accounts: {exc}")

    def _renew(self) -> bool:
        with self._lock:
            asked = dict(self._busy)
        if not asked:
            return True
        try:
            held = self._ledger.renew(self.owner, asked, self._lease)
        except PopsyncError as exc:
            self._trouble(f"cannot renew the leases of the accounts being polled: {exc}")
            return False
        self._recovered()
        with self._lock:
            lost = {n for n, k in asked.items() if n not in held and self._busy.get(n) == k}
        if lost:
            self._on_lost(lost)
        return True

    def _lose_all(self) -> None:
        with self._lock:
            lost = set(self._busy)
        if lost:
            log.warning(
                "leases not renewed for %.10g s: other workers may take over %s; "
                "stopping those polls",
                self._lease,
                ", ".join(sorted(lost)),
                extra={"event": "lease"},
            )
            self._on_lost(lost)

    def _trouble(self, text: str) -> None:
        if not self._failing:  # one line per outage, not one per second
            log.warning("%s (retrying every %.10g s)", text, CLAIM_PERIOD, extra={"event": "lease"})
        self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            log.info("the ledger answers again", extra={"event": "lease"})
        self._failing = False
