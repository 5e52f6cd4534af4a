"""The daemon: ``popsync run`` polls every account on its own schedule, unattended.

Contract
--------
* **Scheduling** (APScheduler 3, a ``BackgroundScheduler``): one job per
  account (id ``poll:<name>``) with an ``IntervalTrigger`` of the account's
  ``interval``; the first poll is due at start.  Jobs run in a thread pool of
  ``max_concurrent`` workers, so polls of different accounts run side by side
  and a slow or failing account never delays the others.  The daemon's own
  in-flight count keeps one account's polls from overlapping (a run fired
  while the previous one still returns marks it "poll again" or starts once
  it has finished; ``max_instances=2`` so the scheduler never drops it), and
  ``coalesce=True`` folds missed runs into one; ``misfire_grace_time=None``
  makes a poll that waited for a free worker run late rather than be dropped.
* **Each poll is** :func:`popsync.sync.run_account` with ``lock_wait=False``:
  the per-account ``flock`` (:mod:`popsync.locks`) keeps a daemon and a
  ``popsync sync`` (or a second daemon) from ever fetching in parallel; the
  loser logs one line and tries again at its next normal time.
* **The job reschedules itself.**  At its start a job pauses its own trigger
  (so a long first sync is never "due again" while it runs); at its end the
  pure :func:`decide` turns the outcome into the next delay, a random jitter
  of up to 10 % (at most 30 s) is added so accounts drift apart, and the
  time is recorded in the ledger for ``popsync status``.
* **Backoff** (:class:`Backoff`): after the n-th temporary failure in a row
  (network, timeout, ``[IN-USE]``, ``[SYS/TEMP]``, a protocol violation) the
  next try comes ``min(30 s * 2**(n-1), cap)`` later, where ``cap`` is
  ``max(interval, min(8 * interval, 1 h))``: an early first retry for a
  passing blip, never slower than the normal schedule for long intervals.
  ``-ERR [LOGIN-DELAY]`` waits at least a full interval.  One success returns
  to the normal interval.
* **LOGIN-DELAY** (RFC 2449 §6.5): the value the server announces is a floor
  on the account's interval and on every retry, logged once when it takes
  effect; capped at :data:`MAX_LOGIN_DELAY` so a server cannot silence an
  account for years (I4).
* **Permanent failure** (``[AUTH]``, ``[SYS/PERM]``, a security refusal, a
  broken secret source) pauses the account with one clear error line: no
  retry loop that gets the user locked out.  A reload (SIGHUP) with a
  changed entry for the account resumes it; SIGUSR1 gives it one more try.
  An OAuth2 account paused for ``popsync auth`` (no token, or the refresh
  token refused) resumes by itself once new tokens are stored: the main
  loop looks at the token store every ``token_watch`` seconds (a file's
  inode and mtime, a keyring entry's digest).
* **Signals** only set a flag and write a byte to a self-pipe; the main
  thread waits on that pipe and does the work (signal handlers take no
  locks).  SIGTERM/SIGINT: stop scheduling, let polls in flight finish
  (bounded by ``grace`` seconds), exit 0.  A second SIGTERM/SIGINT, or the
  grace period running out, ends the process at once with ``os._exit(1)``:
  that is safe because I1/I2 (docs/design.md §2) hold under SIGKILL -- the server deletes
  nothing without QUIT (RFC 1939 §6) and a half-received message never
  reaches ``new/``.  SIGHUP reloads the config: an invalid file is logged and
  the old config kept; added, removed and changed accounts take effect (a
  changed or added account is polled at once; the ledger URL cannot change
  without a restart).  SIGUSR1 polls every account now (after a poll in
  progress, and never sooner than a LOGIN-DELAY allows).
* **Overruns**: a poll ends itself ``poll_timeout`` seconds after it
  connects (its session abandons the server without QUIT, so nothing is
  deleted, RFC 1939 §6).  As a backstop, a poll still running
  ``overrun_grace`` seconds after its ``poll_timeout`` has its connection cut
  from the main thread (:meth:`popsync.session.Session.abort` shuts the socket
  down, waking the worker's blocked read), so a stuck worker is freed and the
  others keep their schedule.  The cut poll fails as temporary.
* **Metrics**: with ``metrics: HOST:PORT`` in the config, :func:`run_daemon`
  serves Prometheus metrics (:mod:`popsync.metrics`) fed by the ``on_poll``
  hook, from before the first poll until the daemon has stopped; changing
  the key takes a restart.
* **Lease mode** (a PostgreSQL ledger, which workers on several hosts may
  share): no job per account.  One claim loop (:mod:`popsync.claimer`)
  claims due accounts from the ledger's lease table
  (:mod:`popsync.ledger.leases`) for the free slots of a pool of
  ``max_concurrent`` threads, renews their leases while they are polled,
  and each poll ends by writing :func:`decide`'s outcome (next due time with
  jitter, failures, LOGIN-DELAY floor, pause) into the account's row, where
  whichever worker claims it next continues from it.  A pause is therefore
  respected by every worker.  Signals act on the shared rows: SIGUSR1 makes
  every account due now (paused ones too), whichever worker claims it;
  SIGHUP adds rows for added accounts (due at once), deletes the rows of
  removed ones and makes changed ones due at once with a fresh schedule --
  every worker should be sent SIGHUP after the shared file changes, since
  each polls with the entries it has loaded.  An account this worker's
  config does not list is given back unpolled.  On SQLite the daemon works
  as described above: one host, where the lock file already keeps processes
  apart, and APScheduler's jobs need no database round trip when idle.
* **Known rows** (:class:`popsync.ledger.rowcache.KnownRows`): the daemon
  keeps each account's slim ledger rows between polls, so a poll of a large
  mailbox with nothing new does not read them all again.  Each poll first
  compares the account's generation in the ledger (bumped by every write to
  its messages, by any process or worker) with the one the rows are at, and
  reads them afresh if it differs; the poll's own writes patch them.  A
  reload drops the rows of removed accounts.
* **Logging**: one line per poll (account, result, counts, next poll) and one
  per problem, with ``account`` and ``event`` fields for ``--log-format
  json``.  Error texts come escaped from :mod:`popsync.sync`; no secret is
  ever formatted here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import select
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor as PollPool
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Final, Literal, NoReturn

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from popsync.claimer import Claimer, worker_id
from popsync.config import Account, Config, load_config
from popsync.errors import ConfigError, PopsyncError, ServerError, TimeoutError_
from popsync.ledger import Ledger
from popsync.ledger.leases import Claim
from popsync.ledger.rowcache import KnownRows
from popsync.locks import AccountBusy
from popsync.oauth.errors import NeedsAuthorization
from popsync.session import Session, SessionOptions
from popsync.sync import PollReport, format_summary, run_account
from popsync.textfmt import format_duration

if TYPE_CHECKING:
    from popsync.metrics import PollMetrics

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_MAX_CONCURRENT",
    "DEFAULT_OVERRUN_GRACE",
    "EXIT_ABORTED",
    "MAX_LOGIN_DELAY",
    "METRICS_MISSING",
    "AccountView",
    "Backoff",
    "Daemon",
    "Decision",
    "Outcome",
    "PollEvent",
    "Schedule",
    "classify",
    "decide",
    "jitter_for",
    "require_metrics",
    "run_daemon",
]

log = logging.getLogger("popsync.daemon")

#: Polls running at once unless ``--max-concurrent`` says otherwise.
DEFAULT_MAX_CONCURRENT: Final = 4
#: Seconds in-flight polls may take to finish after SIGTERM/SIGINT.
DEFAULT_GRACE: Final = 30.0
#: Seconds past its poll_timeout before a poll's connection is cut from outside.
#: The poll's own deadline starts when it connects, so this covers the work
#: before that (lock, crash recovery, a password_command of up to 30 s) and the
#: last batch made durable after the deadline.
DEFAULT_OVERRUN_GRACE: Final = 60.0
#: Seconds between looks at the token store of an account waiting for
#: ``popsync auth`` (a cheap stat; the user is waiting for the daemon).
DEFAULT_TOKEN_WATCH: Final = 10.0
#: Exit status when polls had to be cut off (second signal, grace expired).
EXIT_ABORTED: Final = 1
#: Backoff: first retry after this many seconds, doubling per failure ...
BACKOFF_BASE: Final = 30.0
#: ... up to this many intervals ...
BACKOFF_INTERVALS: Final = 8
#: ... but never more than this (unless the interval itself is longer).
BACKOFF_MAX: Final = 3600.0
#: Jitter: up to this fraction of the delay, at most JITTER_MAX seconds.
JITTER_FRACTION: Final = 0.1
JITTER_MAX: Final = 30.0
#: Largest LOGIN-DELAY honoured (a day); a larger announcement is capped.
MAX_LOGIN_DELAY: Final = 86_400

OutcomeKind = Literal["ok", "busy", "temporary", "permanent"]
#: Opens a session and hands it to the callback before the greeting is read.
SessionOpener = Callable[[SessionOptions, Callable[[Session], None]], Session]


# --------------------------------------------------------------------------
# The policy: pure functions of a poll's outcome


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the scheduler needs to know about one finished poll."""

    kind: OutcomeKind
    #: RFC 2449 §6.5 LOGIN-DELAY the server announced in this poll (None: not
    #: announced, or the poll ended before it could be learnt).
    login_delay: int | None = None
    #: The server refused with ``-ERR [LOGIN-DELAY]``: we came too soon.
    too_soon: bool = False


def classify(report: PollReport) -> Outcome:
    """The :class:`Outcome` of *report* (``busy``: another popsync holds the lock)."""
    if report.ok:
        return Outcome("ok", report.login_delay)
    exc = report.exception
    if isinstance(exc, AccountBusy):
        return Outcome("busy")
    too_soon = (
        isinstance(exc, ServerError) and exc.code is not None and exc.code.top == ("LOGIN-DELAY")
    )
    kind: OutcomeKind = "permanent" if report.temporary is False else "temporary"
    return Outcome(kind, report.login_delay, too_soon)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff after temporary failures (see the module docstring)."""

    base: float = BACKOFF_BASE
    intervals: int = BACKOFF_INTERVALS
    max_delay: float = BACKOFF_MAX

    def cap(self, interval: float) -> float:
        """The longest wait: a few intervals, an hour at most, never below *interval*."""
        return max(interval, min(interval * self.intervals, self.max_delay))

    def delay(self, interval: float, failures: int) -> float:
        """Seconds to wait after the *failures*-th temporary failure in a row (>= 1)."""
        exponent = min(max(failures, 1) - 1, 60)  # 2**60 s is past any cap
        return min(self.base * 2.0**exponent, self.cap(interval))


@dataclass(frozen=True, slots=True)
class Schedule:
    """What the daemon remembers about one account between polls."""

    interval: int
    failures: int = 0
    login_delay: int | None = None
    paused: bool = False

    @property
    def effective_interval(self) -> float:
        """The configured interval, raised to the server's LOGIN-DELAY if larger."""
        return float(max(self.interval, self.login_delay or 0))


@dataclass(frozen=True, slots=True)
class Decision:
    """The account's new :class:`Schedule`, and the seconds until its next poll
    (None: paused until the config changes or SIGUSR1)."""

    schedule: Schedule
    delay: float | None


def decide(schedule: Schedule, outcome: Outcome, backoff: Backoff) -> Decision:
    """The next poll of an account after *outcome*. Pure; see the module docstring."""
    login_delay = schedule.login_delay
    if outcome.kind == "ok":
        login_delay = outcome.login_delay  # what the server says now (None: no floor)
    elif outcome.login_delay is not None:
        login_delay = outcome.login_delay
    if login_delay is not None:
        login_delay = min(max(login_delay, 0), MAX_LOGIN_DELAY) or None
    sched = dataclasses.replace(schedule, login_delay=login_delay)
    if outcome.kind == "ok":
        sched = dataclasses.replace(sched, failures=0, paused=False)
        return Decision(sched, sched.effective_interval)
    if outcome.kind == "busy":  # someone else is polling it: no fault of the server
        return Decision(sched, sched.effective_interval)
    failures = schedule.failures + 1
    if outcome.kind == "permanent":
        return Decision(dataclasses.replace(sched, failures=failures, paused=True), None)
    delay = backoff.delay(sched.interval, failures)
    if outcome.too_soon:
        delay = max(delay, float(sched.interval))
    delay = max(delay, float(sched.login_delay or 0))
    return Decision(dataclasses.replace(sched, failures=failures, paused=False), delay)


def jitter_for(delay: float) -> float:
    """Largest random delay added to a poll after *delay* seconds."""
    return min(delay * JITTER_FRACTION, JITTER_MAX)


# --------------------------------------------------------------------------
# Observing the daemon


@dataclass(frozen=True, slots=True)
class PollEvent:
    """One finished poll, as handed to the ``on_poll`` observer (tests, metrics)."""

    account: str
    report: PollReport
    outcome: Outcome
    #: Seconds to the next poll as decided (None: paused, stopping or removed).
    delay: float | None
    #: When the next poll is due (epoch seconds, jitter included), or None.
    next_poll_at: float | None
    failures: int
    paused: bool


@dataclass(frozen=True, slots=True)
class AccountView:
    """A snapshot of one account's scheduling state."""

    name: str
    interval: int
    effective_interval: float
    failures: int
    paused: bool
    running: bool
    login_delay: int | None
    next_poll_at: float | None


@dataclass(eq=False)
class _AccountState:
    account: Account
    schedule: Schedule
    generation: int
    last_started: float | None = None
    next_poll_at: float | None = None
    #: Poll again as soon as the poll in progress ends (SIGUSR1, a reload).
    poll_again: bool = False
    #: The LOGIN-DELAY value last warned about (one warning per value).
    warned_login_delay: int | None = None


def _open_session(options: SessionOptions, on_open: Callable[[Session], None]) -> Session:
    return Session.open(options, on_open=on_open)


class _Overrun:
    """The watchdog of one poll: cuts its connection once :attr:`due` has passed.

    :meth:`attach` (the poll's thread) and :meth:`cut` (the main thread) may
    race; the lock makes the cut reach the session either way.
    """

    def __init__(self, account: Account, due: float) -> None:
        self.name = account.name
        self.poll_timeout = account.poll_timeout
        self.due = due  # on the monotonic clock
        self.fired = False
        self._lock = threading.Lock()
        self._session: Session | None = None
        self._error: TimeoutError_ | None = None

    def attach(self, session: Session) -> None:
        """Remember the poll's session; raises the cut's error if it came first."""
        with self._lock:
            self._session = session
            if self._error is not None:
                raise self._error

    def cut(self) -> None:
        """Abort the poll's session (now, or as soon as it exists)."""
        with self._lock:
            self.fired = True
            self._error = TimeoutError_(
                f"poll took longer than poll_timeout ({self.poll_timeout:.10g} s) "
                "and was cut off by the daemon"
            )
            if self._session is not None:
                self._session.abort(self._error)


@dataclass
class _Requests:
    """Flags written by signal handlers (plain stores, no locks), read by the main loop."""

    stops: int = 0
    reload: bool = False
    poll_now: bool = False


# --------------------------------------------------------------------------
# The daemon


def _job_id(name: str) -> str:
    return f"poll:{name}"


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _trigger(seconds: float) -> IntervalTrigger:
    """An interval of *seconds* with its jitter, in UTC (no local-zone lookup)."""
    return IntervalTrigger(
        seconds=max(seconds, 0.001), jitter=jitter_for(seconds) or None, timezone=UTC
    )


class Daemon:
    """Polls the accounts of a config on their schedules until asked to stop.

    Use :meth:`serve` in one thread (the main thread when signals drive it,
    see :func:`run_daemon`); the ``request_*`` methods may be called from any
    thread and from signal handlers.  The ledger is opened by :meth:`serve`
    and closed when it returns.
    """

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        grace: float = DEFAULT_GRACE,
        backoff: Backoff | None = None,
        on_poll: Callable[[PollEvent], None] | None = None,
        hard_exit: Callable[[int], NoReturn] = os._exit,
        overrun_grace: float = DEFAULT_OVERRUN_GRACE,
        open_session: SessionOpener = _open_session,
        token_watch: float = DEFAULT_TOKEN_WATCH,
    ) -> None:
        """Prepare (nothing runs until :meth:`serve`).

        *open_session* opens each poll's session and must pass it to its
        callback as soon as it exists (the overrun watchdog aborts it through
        that); tests replace it.

        Raises:
            ConfigError: *max_concurrent* is below 1 or *grace* is negative.
        """
        if max_concurrent < 1:
            raise ConfigError(f"--max-concurrent must be at least 1, not {max_concurrent}")
        if not grace >= 0:
            raise ConfigError(f"--grace must be zero or more seconds, not {grace}")
        self._config = config
        self._config_path = config_path
        self._max_concurrent = max_concurrent
        self._grace = grace
        self._backoff = backoff or Backoff()
        self._on_poll = on_poll
        self._hard_exit = hard_exit
        self._overrun_grace = overrun_grace
        self._open_session = open_session
        self._token_watch = token_watch
        #: Accounts paused until new OAuth2 tokens are stored: how to read
        #: the store's stamp, and the stamp when the account paused.
        self._token_waits: dict[str, tuple[Callable[[], object], object]] = {}
        self._overruns: set[_Overrun] = set()
        self._state_dir = config.state_dir
        self._ledger: Ledger | None = None
        self._scheduler: BackgroundScheduler | None = None
        # Lease mode (a PostgreSQL ledger): a claim loop and a pool instead
        # of one scheduler job per account.
        self._lease_mode = config.shared_ledger
        self._worker_id = worker_id()
        self._claimer: Claimer | None = None
        self._pool: PollPool | None = None
        #: Accounts whose lease this worker lost mid-poll: those polls stop.
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        self._states: dict[str, _AccountState] = {}
        # Polls between their start and their last log line, by account: the
        # stop waits for these.  _in_flight (the overlap guard) drops earlier,
        # when the next poll has been planned.
        self._active: Counter[str] = Counter()
        self._in_flight: Counter[str] = Counter()
        self._generation = 0
        #: Each account's ledger rows between its polls, checked against the
        #: ledger's per-account generation at every poll.
        self._known = KnownRows()
        self._stopping = False
        self._requests = _Requests()
        self.started = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- requests: safe from signal handlers and other threads ------------

    def request_stop(self) -> None:
        """Stop (first call) or abort at once (any further call)."""
        self._requests.stops += 1
        self._wake()

    def request_reload(self) -> None:
        """Re-read the config file (SIGHUP)."""
        self._requests.reload = True
        self._wake()

    def request_poll_now(self) -> None:
        """Poll every account as soon as possible (SIGUSR1)."""
        self._requests.poll_now = True
        self._wake()

    @property
    def wake_fd(self) -> int:
        """The write end of the pipe that wakes the main loop (non-blocking)."""
        return self._wake_w

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full pipe: a wake-up is pending anyway
            os.write(self._wake_w, b"\0")

    def _wait(self, timeout: float | None) -> None:
        with contextlib.suppress(InterruptedError):
            select.select([self._wake_r], [], [], timeout)
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 512):
                pass

    # -- observing ----------------------------------------------------------

    def snapshot(self) -> dict[str, AccountView]:
        """The scheduling state of every configured account."""
        with self._lock:
            return {
                name: AccountView(
                    name=name,
                    interval=st.schedule.interval,
                    effective_interval=st.schedule.effective_interval,
                    failures=st.schedule.failures,
                    paused=st.schedule.paused,
                    running=self._in_flight[name] > 0,
                    login_delay=st.schedule.login_delay,
                    next_poll_at=st.next_poll_at,
                )
                for name, st in self._states.items()
            }

    # -- life cycle ---------------------------------------------------------

    def serve(self) -> int:
        """Run until stopped; returns the exit status (0 after a clean stop).

        Raises:
            LedgerError: the ledger cannot be opened.
        """
        try:
            self._start()
            while not self._requests.stops:
                self._wait(self._next_wake())
                self._cut_overruns()
                self._resume_authorized()
                if self._requests.stops:
                    break
                if self._requests.reload:
                    self._requests.reload = False
                    self._reload()
                if self._requests.poll_now:
                    self._requests.poll_now = False
                    self._poll_all_now()
            return self._shutdown()
        finally:
            self._close()

    def _start(self) -> None:
        self._ledger = Ledger.open(self._config.ledger_url)
        if self._lease_mode:
            self._start_leasing(self._ledger)
            return
        scheduler_log = logging.getLogger("popsync.daemon.scheduler")
        if scheduler_log.level == logging.NOTSET:
            # APScheduler narrates every job at INFO; only its problems matter here.
            scheduler_log.setLevel(logging.WARNING)
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(self._max_concurrent)},
            # Two instances: a run fired while the previous one is returning (its
            # result already recorded, e.g. SIGUSR1 at that moment) must not be
            # dropped as "maximum number of running instances reached".  The
            # daemon's own in-flight count keeps two polls of one account from
            # ever overlapping (see _poll_job).
            job_defaults={"coalesce": True, "max_instances": 2, "misfire_grace_time": None},
            timezone=UTC,
            logger=scheduler_log,
            daemon=True,
        )
        now = time.time()
        with self._lock:
            for account in self._config.accounts:
                self._add(account, first_at=now)
        self._scheduler.start()
        names = ", ".join(a.name for a in self._config.accounts)
        log.info(
            "daemon started: %d account(s) (%s), up to %d poll(s) at once",
            len(self._config.accounts),
            names,
            self._max_concurrent,
            extra={"event": "started"},
        )
        self.started.set()

    def _start_leasing(self, ledger: Ledger) -> None:
        """Lease mode: rows for the configured accounts, the pool, the claim loop."""
        now = time.time()
        with self._lock:
            for account in self._config.accounts:
                self._add(account, first_at=now)
        ledger.ensure_accounts(a.name for a in self._config.accounts)
        self._pool = PollPool(self._max_concurrent, thread_name_prefix="popsync-poll")
        self._claimer = Claimer(
            ledger,
            owner=self._worker_id,
            lease=self._config.lease,
            slots=self._max_concurrent,
            start=self._start_claimed,
            on_lost=self._leases_lost,
        )
        self._claimer.start()
        log.info(
            "daemon started as worker %s: %d account(s) shared through the ledger's leases "
            "(%s s), up to %d poll(s) at once",
            self._worker_id,
            len(self._config.accounts),
            format(self._config.lease, ".10g"),
            self._max_concurrent,
            extra={"event": "started"},
        )
        self.started.set()

    def _start_claimed(self, claim: Claim) -> bool:
        """Queue the poll of a claimed account (the claimer's thread); False: give it back."""
        with self._lock:
            state = self._states.get(claim.name)
            if self._stopping or state is None or self._in_flight[claim.name]:
                return False
            # Continue the schedule every worker shares from the row.
            state.schedule = dataclasses.replace(
                state.schedule,
                failures=claim.failures,
                login_delay=claim.login_delay,
                paused=False,
            )
            self._lost.discard(claim.name)
        assert self._pool is not None
        try:
            self._pool.submit(self._poll_job, claim.name)
        except RuntimeError:  # the pool is shut down: stopping
            return False
        return True

    def _leases_lost(self, names: set[str]) -> None:
        with self._lock:
            self._lost |= names
        for name in sorted(names):
            log.warning(
                "%s: this worker's lease ran out and another worker may poll it now; "
                "stopping this poll after the messages in flight",
                name,
                extra={"account": name, "event": "lease"},
            )

    def _close(self) -> None:
        if self._claimer is not None:
            self._claimer.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _shutdown(self) -> int:
        with self._lock:
            self._stopping = True
            busy = sorted(+self._active)
        # Queued polls still reach _poll_job, which now returns at once.
        if self._claimer is not None:
            self._claimer.stop()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        if busy:
            log.info(
                "stopping: waiting up to %s for the poll(s) of %s to finish "
                "(signal again to abort at once)",
                format_duration(self._grace),
                ", ".join(busy),
                extra={"event": "stopping"},
            )
        deadline = time.monotonic() + self._grace
        while True:
            with self._lock:
                busy = sorted(+self._active)
            if not busy:
                break
            if self._requests.stops > 1:
                self._abort(f"second signal: aborting the poll(s) of {', '.join(busy)} now")
            left = deadline - time.monotonic()
            if left <= 0:
                self._abort(
                    f"grace period of {format_duration(self._grace)} over: "
                    f"cutting off the poll(s) of {', '.join(busy)}"
                )
            overrun = self._until_overrun()
            self._wait(min(left, 1.0) if overrun is None else min(left, 1.0, overrun))
            self._cut_overruns()
        log.info("stopped", extra={"event": "stopped"})
        return 0

    def _abort(self, why: str) -> NoReturn:
        # I1/I2 hold under SIGKILL by design, so ending without unwinding is
        # safe: the server deletes nothing without QUIT (RFC 1939 §6), a
        # message not yet linked into new/ is fetched again next time, and one
        # that was linked is recognised by its name.
        log.error(
            "%s; nothing is lost or duplicated, the next run picks up from the ledger",
            why,
            extra={"event": "abort"},
        )
        for handler in [*logging.getLogger("popsync").handlers, *logging.getLogger().handlers]:
            with contextlib.suppress(Exception):
                handler.flush()
        self._hard_exit(EXIT_ABORTED)

    # -- jobs ----------------------------------------------------------------

    def _add(self, account: Account, *, first_at: float) -> None:
        """Create the state and (but in lease mode) the job of *account* (caller
        holds the lock)."""
        self._generation += 1
        state = _AccountState(account, Schedule(account.interval), self._generation)
        state.next_poll_at = first_at
        self._states[account.name] = state
        if self._lease_mode:
            return
        assert self._scheduler is not None
        self._scheduler.add_job(
            self._poll_job,
            _trigger(account.interval),
            args=(account.name,),
            id=_job_id(account.name),
            name=f"poll {account.name}",
            next_run_time=_utc(first_at),
            replace_existing=True,
        )

    def _poll_job(self, name: str) -> None:
        """One scheduled poll of account *name* (runs in a pool thread)."""
        started = self._begin_poll(name)
        if started is None:
            self._unpolled(name)
            return
        generation, account, watch = started
        self._wake()  # the main loop now has this poll's overrun to watch for
        report: PollReport | None = None
        try:
            assert self._ledger is not None
            report = run_account(
                account,
                self._ledger,
                self._state_dir,
                lock_wait=False,
                session_factory=lambda opts: self._open_session(opts, watch.attach),
                should_stop=lambda: self._stopping or name in self._lost,
                known=self._known,
            )
        except Exception as exc:  # a bug, not a fault: keep the daemon (and the others) alive
            log.exception(
                "%s: internal error during the poll", name, extra={"account": name, "event": "bug"}
            )
            report = PollReport(name, error=f"internal error: {type(exc).__name__}", temporary=True)
        finally:
            if report is None:  # BaseException escaping: still release the account
                report = PollReport(name, error="poll interrupted", temporary=True)
            try:
                self._finish(name, generation, report)
            finally:
                with self._lock:
                    self._active[name] -= 1
                    self._overruns.discard(watch)
                    removed = name not in self._states
                if removed:  # a reload dropped it while it polled: the poll kept rows again
                    self._known.forget([name])
                self._wake()  # the main loop may be waiting for polls to end

    def _next_wake(self) -> float | None:
        """Seconds the main loop may sleep: until an overrun, or a token-store look."""
        overrun = self._until_overrun()
        with self._lock:
            watching = bool(self._token_waits)
        if not watching:
            return overrun
        return self._token_watch if overrun is None else min(overrun, self._token_watch)

    def _wait_for_tokens(self, name: str) -> None:
        """Watch *name*'s token store from now on (it paused for ``popsync auth``)."""
        from popsync.oauth.store import open_store

        try:
            stamp = open_store(self._state_dir, name).stamp
            self._token_waits[name] = (stamp, stamp())
        except PopsyncError as exc:
            log.warning(
                "%s: cannot watch its token store (%s); SIGUSR1 resumes it",
                name,
                exc,
                extra={"account": name, "event": "paused"},
            )

    def _resume_authorized(self) -> None:
        """Resume every account whose token store changed since it paused (main thread)."""
        with self._lock:
            waits = dict(self._token_waits)
        changed = []
        for name, (stamp, before) in waits.items():
            try:
                if stamp() != before:
                    changed.append(name)
            except PopsyncError:
                continue  # a keyring hiccup: look again next time
        for name in changed:
            with self._lock:
                self._token_waits.pop(name, None)
                state = self._states.get(name)
                if state is None or not state.schedule.paused or self._stopping:
                    continue
                state.schedule = dataclasses.replace(state.schedule, paused=False, failures=0)
                if not self._lease_mode:
                    self._reschedule_at(state, time.time())
            if self._lease_mode and self._ledger is not None:
                # The pause lives in the shared row: un-pause it there, for
                # whichever worker claims the account next.
                try:
                    self._ledger.reset_accounts([name])
                except PopsyncError as exc:
                    log.warning(
                        "%s: new OAuth2 tokens stored, but the ledger could not resume it "
                        "(%s); SIGUSR1 resumes it",
                        name,
                        exc,
                        extra={"account": name, "event": "paused"},
                    )
                    continue
            log.info(
                "%s: new OAuth2 tokens stored; resuming",
                name,
                extra={"account": name, "event": "resume"},
            )

    def _begin_poll(self, name: str) -> tuple[int, Account, _Overrun] | None:
        """Mark *name* in flight: (generation, entry, watchdog), or None if it must
        not be polled now (stopping, removed, or an earlier poll still runs)."""
        with self._lock:
            state = self._states.get(name)
            if self._stopping or state is None:
                return None
            if self._in_flight[name]:
                # An earlier poll of this name (before a reload) still runs.
                state.poll_again = True
                return None
            self._in_flight[name] += 1
            self._active[name] += 1
            self._pause_job(name)
            state.last_started = time.time()
            state.next_poll_at = None
            account = state.account
            watch = _Overrun(account, time.monotonic() + account.poll_timeout + self._overrun_grace)
            self._overruns.add(watch)
            return state.generation, account, watch

    def _unpolled(self, name: str) -> None:
        """A claimed account's poll did not run (stopping, removed): give it back now."""
        if self._claimer is None or self._ledger is None:
            return
        try:
            self._ledger.give_back(self._worker_id, [name], 0.0)
        except PopsyncError as exc:
            log.warning(
                "%s: could not give back its lease (others take it when it runs out): %s",
                name,
                exc,
                extra={"account": name, "event": "lease"},
            )
        self._claimer.done(name)

    def _until_overrun(self) -> float | None:
        """Seconds until the next poll overruns (None: no poll to watch)."""
        with self._lock:
            dues = [w.due for w in self._overruns if not w.fired]
        return max(0.0, min(dues) - time.monotonic()) if dues else None

    def _cut_overruns(self) -> None:
        """Cut the connection of every poll past its poll_timeout and grace (main thread)."""
        now = time.monotonic()
        with self._lock:
            due = [w for w in self._overruns if not w.fired and w.due <= now]
        for watch in due:
            log.warning(
                "%s: poll still running %s after its poll_timeout of %s; cutting its connection",
                watch.name,
                format_duration(self._overrun_grace),
                format_duration(watch.poll_timeout),
                extra={"account": watch.name, "event": "overrun"},
            )
            watch.cut()

    def _finish(self, name: str, generation: int, report: PollReport) -> None:
        outcome = classify(report)
        delay: float | None = None
        next_at: float | None = None
        warn_delay: int | None = None
        paused, failures, interval = False, 0, 0
        login_delay: int | None = None
        with self._lock:
            self._in_flight[name] -= 1
            state = self._states.get(name)
            # In lease mode the outcome is written into the shared row even
            # when stopping, so another worker continues from it.
            if (not self._stopping or self._lease_mode) and state is not None:
                next_at, delay, warn_delay = self._plan_next(state, generation, outcome)
                paused, failures = state.schedule.paused, state.schedule.failures
                interval = state.account.interval
                if paused and isinstance(report.exception, NeedsAuthorization):
                    self._wait_for_tokens(name)
                login_delay = state.schedule.login_delay
        if self._lease_mode:
            self._release(name, next_at, paused=paused, failures=failures, floor=login_delay)
        self._log_poll(name, report, outcome, next_at, failures, paused)
        if warn_delay is not None:
            log.warning(
                "%s: the server allows a login only every %s (RFC 2449 LOGIN-DELAY); "
                "polling every %s instead of every %s",
                name,
                format_duration(warn_delay),
                format_duration(warn_delay),
                format_duration(interval),
                extra={"account": name, "event": "login-delay"},
            )
        if outcome.kind != "busy" and not self._lease_mode:
            # (a busy poll left no row of its own to annotate; in lease mode
            # the account's row holds the time)
            self._record_next(name, next_at)
        if self._on_poll is not None:
            self._on_poll(PollEvent(name, report, outcome, delay, next_at, failures, paused))

    def _plan_next(
        self, state: _AccountState, generation: int, outcome: Outcome
    ) -> tuple[float | None, float | None, int | None]:
        """Apply :func:`decide` and reschedule: (next poll time, delay, LOGIN-DELAY to
        warn about). Caller holds the lock."""
        delay, asked, warn_delay = self._decide_next(state, generation, outcome)
        if delay is None:
            self._pause_job(state.account.name)
            state.next_poll_at = None
            return None, None, warn_delay
        if self._lease_mode:
            return self._lease_next(state, delay, asked=asked), delay, warn_delay
        if asked:
            return self._reschedule_at(state, time.time()), 0.0, warn_delay
        return self._reschedule_after(state, delay), delay, warn_delay

    def _decide_next(
        self, state: _AccountState, generation: int, outcome: Outcome
    ) -> tuple[float | None, bool, int | None]:
        """Apply :func:`decide`: (delay, None when paused; whether to poll again at
        once; the LOGIN-DELAY to warn about). Caller holds the lock."""
        warn_delay: int | None = None
        if state.generation == generation:
            decision = decide(state.schedule, outcome, self._backoff)
            state.schedule = decision.schedule
            delay = decision.delay
            floor = decision.schedule.login_delay
            if floor is not None and floor > state.account.interval:
                if state.warned_login_delay != floor:
                    warn_delay = state.warned_login_delay = floor
            else:
                state.warned_login_delay = None
            # SIGUSR1 during the poll: once more now -- unless it just paused.
            asked = state.poll_again and delay is not None
        else:
            # The entry changed while this poll ran: poll under the new entry now.
            delay, asked = 0.0, True
        state.poll_again = False
        return delay, asked, warn_delay

    def _lease_next(self, state: _AccountState, delay: float, *, asked: bool) -> float:
        """Lease mode: when the account is due again (epoch seconds), with jitter,
        or at once when *asked* (never sooner than LOGIN-DELAY allows); the
        release writes it into the row (caller holds the lock)."""
        now = time.time()
        if asked:
            floor = state.schedule.login_delay
            at = now
            if floor and state.last_started is not None:
                at = max(at, state.last_started + floor)
        else:
            at = now + delay + random.uniform(0.0, jitter_for(delay))  # noqa: S311 - spreading, not secrecy
        state.next_poll_at = at
        return at

    def _reschedule_after(self, state: _AccountState, delay: float) -> float | None:
        """Next poll *delay* (+ jitter) seconds from now; returns its time (lock held)."""
        assert self._scheduler is not None
        try:
            job = self._scheduler.reschedule_job(
                _job_id(state.account.name), trigger=_trigger(delay)
            )
        except JobLookupError:
            return None
        when = job.next_run_time
        state.next_poll_at = when.timestamp() if when is not None else None
        return state.next_poll_at

    def _reschedule_at(self, state: _AccountState, at: float) -> float | None:
        """Next poll at *at*, or later if LOGIN-DELAY demands it (lock held)."""
        assert self._scheduler is not None
        floor = state.schedule.login_delay
        if floor and state.last_started is not None:
            at = max(at, state.last_started + floor)
        try:
            self._scheduler.modify_job(_job_id(state.account.name), next_run_time=_utc(at))
        except JobLookupError:
            return None
        state.next_poll_at = at
        return at

    def _pause_job(self, name: str) -> None:
        if self._scheduler is None:  # lease mode: no jobs
            return
        with contextlib.suppress(JobLookupError):
            self._scheduler.pause_job(_job_id(name))

    def _release(
        self, name: str, next_at: float | None, *, paused: bool, failures: int, floor: int | None
    ) -> None:
        """Lease mode: write the poll's outcome into *name*'s row and free its slot."""
        assert self._ledger is not None and self._claimer is not None
        try:
            if next_at is None and not paused:  # removed from the config meanwhile
                self._ledger.give_back(self._worker_id, [name], 0.0)
            else:
                delay = None if next_at is None else max(next_at - time.time(), 0.0)
                self._ledger.release(
                    self._worker_id, name, delay=delay, failures=failures, login_delay=floor
                )
        except PopsyncError as exc:
            log.warning(
                "%s: could not record the next poll (other workers take the account when "
                "this worker's lease runs out): %s",
                name,
                exc,
                extra={"account": name, "event": "lease"},
            )
        finally:
            self._claimer.done(name)

    def _record_next(self, name: str, next_at: float | None) -> None:
        if self._ledger is None:
            return
        try:
            self._ledger.set_next_poll(name, next_at)
        except PopsyncError as exc:
            log.warning(
                "%s: could not record the next poll time: %s",
                name,
                exc,
                extra={"account": name, "event": "ledger"},
            )

    def _log_poll(
        self,
        name: str,
        report: PollReport,
        outcome: Outcome,
        next_at: float | None,
        failures: int,
        paused: bool,
    ) -> None:
        extra = {"account": name, "event": "poll"}
        if next_at is not None:
            nxt = f"next poll in {format_duration(next_at - time.time())}"
        elif self._stopping:
            nxt = "the daemon is stopping"
        else:
            nxt = "no further polls"
        if outcome.kind == "ok":
            log.info("%s: ok: %s; %s", name, format_summary(report), nxt, extra=extra)
        elif outcome.kind == "busy":
            holder = getattr(report.exception, "holder", None)
            who = f"process {holder}" if holder is not None else "another popsync"
            log.info("%s: skipped: %s is polling it already; %s", name, who, nxt, extra=extra)
        elif paused and isinstance(report.exception, NeedsAuthorization):
            log.error(
                "%s: PAUSED: %s. Polling resumes once new tokens are stored",
                name,
                report.error,
                extra={"account": name, "event": "paused"},
            )
        elif paused:
            log.error(
                "%s: PAUSED: %s. No more polls of this account until its entry in %s "
                "changes and popsync reloads (SIGHUP), or SIGUSR1 asks for one more try",
                name,
                report.error,
                self._config_path,
                extra={"account": name, "event": "paused"},
            )
        else:
            log.warning(
                "%s: poll failed (temporary, %d in a row): %s; %s",
                name,
                failures,
                report.error,
                nxt,
                extra=extra,
            )

    # -- SIGUSR1 ----------------------------------------------------------------

    def _poll_all_now(self) -> None:
        if self._lease_mode:
            self._lease_poll_all_now()
            return
        now = time.time()
        with self._lock:
            for name, state in self._states.items():
                if self._in_flight[name]:
                    state.poll_again = True
                    continue
                if state.schedule.paused:
                    log.info(
                        "%s: paused, but polling it once as asked",
                        name,
                        extra={"account": name, "event": "resume"},
                    )
                self._reschedule_at(state, now)
        log.info("polling every account now (SIGUSR1)", extra={"event": "poll-now"})

    def _lease_poll_all_now(self) -> None:
        """SIGUSR1 in lease mode: every row due now, paused ones too, for whichever
        worker claims them first; this worker's polls in progress poll once more."""
        with self._lock:
            names = list(self._states)
            for name in names:
                if self._in_flight[name]:
                    self._states[name].poll_again = True
        self._ledger_call("make every account due now", lambda ledger: ledger.poll_now(names))
        log.info(
            "polling every account now, on whichever worker claims it (SIGUSR1)",
            extra={"event": "poll-now"},
        )

    def _ledger_call(self, what: str, call: Callable[[Ledger], object]) -> None:
        """Run *call* on the ledger; a failure is one warning line."""
        assert self._ledger is not None
        try:
            call(self._ledger)
        except PopsyncError as exc:
            log.warning("could not %s: %s", what, exc, extra={"event": "ledger"})

    # -- SIGHUP -------------------------------------------------------------------

    def _reload(self) -> None:
        try:
            new = load_config(self._config_path)
        except ConfigError as exc:
            problems = str(exc).splitlines() or [str(exc)]
            log.error(
                "config reload failed; still running on the previous config: %s",
                "; ".join(problems),
                extra={"event": "reload"},
            )
            return
        if new.ledger_url != self._config.ledger_url:
            log.warning(
                "the ledger setting changed; that takes a restart, so popsync keeps %s",
                self._config.ledger_shown,
                extra={"event": "reload"},
            )
        if (new.metrics, new.metrics_allow_remote) != (
            self._config.metrics,
            self._config.metrics_allow_remote,
        ):
            log.warning(
                "the metrics setting changed; that takes a restart, so popsync keeps serving "
                "them as before",
                extra={"event": "reload"},
            )
        now = time.time()
        added, removed, changed, paused = [], [], [], []
        with self._lock:
            wanted = {account.name: account for account in new.accounts}
            for name in [n for n in self._states if n not in wanted]:
                del self._states[name]
                if self._scheduler is not None:
                    with contextlib.suppress(JobLookupError):
                        self._scheduler.remove_job(_job_id(name))
                removed.append(name)
            for name, account in wanted.items():
                state = self._states.get(name)
                if state is None:
                    self._add(account, first_at=now)
                    added.append(name)
                elif account != state.account:
                    self._change(state, account, now)
                    changed.append(name)
                elif state.schedule.paused:
                    paused.append(name)
        self._config = new
        self._known.forget(removed)
        if self._lease_mode:
            reset = [n for n in changed if not self._in_flight[n]]

            def update_rows(ledger: Ledger) -> None:
                ledger.forget_accounts(removed)
                ledger.ensure_accounts(added)
                ledger.reset_accounts(reset)

            self._ledger_call("update the lease table", update_rows)
        log.info(
            "config reloaded: %d account(s); added: %s; removed: %s; changed: %s",
            len(wanted),
            ", ".join(added) or "none",
            ", ".join(removed) or "none",
            ", ".join(changed) or "none",
            extra={"event": "reload"},
        )
        for name in paused:
            log.warning(
                "%s: still paused (its entry did not change); send SIGUSR1 to try it once",
                name,
                extra={"account": name, "event": "paused"},
            )

    def _change(self, state: _AccountState, account: Account, now: float) -> None:
        """Apply a changed entry: fresh schedule, polled now (caller holds the lock)."""
        old = state.account
        same_server = (old.host, old.port, old.username) == (
            account.host,
            account.port,
            account.username,
        )
        self._generation += 1
        state.generation = self._generation
        state.account = account
        # The server's LOGIN-DELAY still binds the same login on the same server.
        floor = state.schedule.login_delay if same_server else None
        state.schedule = Schedule(account.interval, login_delay=floor)
        state.warned_login_delay = state.warned_login_delay if same_server else None
        if self._in_flight[account.name]:
            state.poll_again = True  # _finish polls it under the new entry
            return
        if self._scheduler is None:  # lease mode: the reload resets its row
            return
        with contextlib.suppress(JobLookupError):
            self._scheduler.reschedule_job(
                _job_id(account.name), trigger=_trigger(account.interval)
            )
        self._reschedule_at(state, now)


# --------------------------------------------------------------------------
# Entry point


@contextlib.contextmanager
def _signals(daemon: Daemon) -> Iterator[None]:
    """Route SIGTERM/SIGINT/SIGHUP/SIGUSR1 to *daemon* while the block runs."""
    actions: dict[int, Callable[[], None]] = {
        signal.SIGTERM: daemon.request_stop,
        signal.SIGINT: daemon.request_stop,
        signal.SIGHUP: daemon.request_reload,
        signal.SIGUSR1: daemon.request_poll_now,
    }

    def handler(signum: int, frame: FrameType | None) -> None:
        actions[signum]()  # sets a flag and writes to a pipe: nothing more

    previous = {}
    # The kernel may deliver a signal to any thread (the poll and I/O worker
    # threads included), and then the main thread's select() is not
    # interrupted; Python runs the handler only when the main thread next
    # executes.  The wakeup fd is written by the C-level handler whatever
    # thread took the signal, so the main loop wakes at once.
    old_wakeup = signal.set_wakeup_fd(daemon.wake_fd)
    try:
        for signum in actions:
            previous[signum] = signal.signal(signum, handler)
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        signal.set_wakeup_fd(old_wakeup)


#: The one line ``check`` and ``run`` print when ``metrics`` is set but the
#: optional dependency is not installed.
METRICS_MISSING: Final = "metrics needs popsync[metrics]: pip install 'popsync[metrics]'"


def require_metrics(config: Config) -> None:
    """Check that the ``metrics`` key of *config*, if set, can be served.

    Raises:
        ConfigError: ``metrics`` is set but ``prometheus_client`` (the extra
            ``popsync[metrics]``) cannot be imported; one line naming the file.
    """
    if config.metrics is None:
        return
    try:
        import popsync.metrics  # noqa: F401 - imported to learn whether it can be
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "prometheus_client":
            raise
        where = f"{config.source}: " if config.source is not None else ""
        raise ConfigError(f"{where}{METRICS_MISSING}") from None


def _poll_metrics(config: Config) -> PollMetrics | None:
    """The metrics *config* asks for (None: the ``metrics`` key is not set).

    Raises:
        ConfigError: the library is missing (see :func:`require_metrics`).
    """
    if config.metrics is None:
        return None
    require_metrics(config)
    from popsync.metrics import PollMetrics

    return PollMetrics(a.name for a in config.accounts)


@contextlib.contextmanager
def _serving(config: Config, metrics: PollMetrics | None) -> Iterator[None]:
    """Serve *metrics* at the configured address while the block runs.

    Raises:
        ConfigError: the address cannot be bound; one line naming the file.
    """
    if metrics is None or config.metrics is None:
        yield
        return
    from popsync.metrics import MetricsServer

    try:
        server = MetricsServer(config.metrics, metrics.registry)
    except ConfigError as exc:
        where = f"{config.source}: " if config.source is not None else ""
        raise ConfigError(f"{where}{exc}") from None
    log.info("serving metrics at http://%s/metrics", config.metrics, extra={"event": "metrics"})
    with server:
        yield


def run_daemon(
    config: Config,
    *,
    config_path: Path,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    grace: float = DEFAULT_GRACE,
) -> int:
    """``popsync run``: serve *config* in the foreground until SIGTERM or SIGINT.

    Must run in the main thread (signal handlers are installed there).
    Returns 0 after a clean stop; a forced stop ends the process with
    :data:`EXIT_ABORTED` without returning.  With ``metrics`` set, the
    metrics (:mod:`popsync.metrics`) are fed by the daemon's ``on_poll`` hook
    and served from before the first poll until the daemon has stopped.

    Raises:
        ConfigError: *max_concurrent* or *grace* is out of range; ``metrics``
            is set but its library is missing or its address cannot be bound.
        LedgerError: the ledger cannot be opened.
    """
    metrics = _poll_metrics(config)
    daemon = Daemon(
        config,
        config_path=config_path,
        max_concurrent=max_concurrent,
        grace=grace,
        on_poll=metrics.observe if metrics is not None else None,
    )
    if metrics is not None:
        metrics.view = daemon.snapshot
    with _serving(config, metrics), _signals(daemon):
        return daemon.serve()
