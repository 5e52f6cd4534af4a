"""One poll of one account, in the safe order.

:func:`run_account` never raises for a network, server, storage or config
fault: it returns a :class:`PollReport` that says what happened and whether
a retry may help (``temporary``).  The order of side effects is the
product's promise; :meth:`Poll.session` is that order, step by step, and
each step is a unit of its own:

1. **Lock and recover.**  Take the account's lock.  A ledger row left
   ``fetching`` whose copy the target already holds (a crash between the
   target's commit and the ledger's) is recorded as delivered
   (:mod:`popsync.reconcile`); nothing is fetched twice.
2. **Connect**, TLS, authenticate (:mod:`popsync.session`); **list** UIDL,
   and LIST only where sizes matter.  **Remap**: only if unknown unique-ids
   are listed *and* delivered rows of their size vanished, ``TOP n 0`` for
   those; one that matches exactly one such row's headers takes the row
   over (a renumbering server), so it is not fetched again.  **Refetch**
   (only ``sync --refetch``, :mod:`popsync.refetch`): delivered rows whose
   Maildir copy is missing or damaged, and whose message the server still
   lists as the one stored, go back to ``fetching`` under a fresh name.
3. **Plan** -- pure (:func:`popsync.plan.plan`): what to fetch, skip, DELE.
4. **Confirm** due DELEs of mail delivered in an earlier session: ``TOP n 0``
   and the LIST size must show the message is still the complete copy
   stored (:func:`popsync.identity.judge`).
5. **Name** every message to fetch and commit those names in the ledger
   before any RETR (a copy found at the target under its name is recorded,
   not fetched: a lost ledger).
6. **Fetch**, pipelined, into the target (:class:`popsync.fetch.Fetcher`):
   each body counts once the server's next reply shows it whole; per batch
   the target commits, then the ledger, and only then are the batch's DELEs
   allowed (:class:`popsync.fetch.DeleGate`).
7. **QUIT**; only after ``+OK`` are rows marked ``deleted`` -- the server
   deletes at QUIT (RFC 1939 §6).  A lost QUIT reply leaves them
   ``delivered``; the next listing settles it.

On any error the connection is dropped without QUIT, so the server deletes
nothing of this session; what was delivered and committed stays, and its
DELE is simply repeated next time.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from popsync import failpoints
from popsync.config import Account
from popsync.deliver import message_name, open_target
from popsync.deliver.base import Held, Pending, Target
from popsync.errors import (
    BodyLimitExceeded,
    DeliveryError,
    PopsyncError,
    RemoteProtocolError,
    ServerError,
    TransportError,
    escape_server_text,
)
from popsync.fetch import DeleGate, Fetcher, FetchOutcome, HeaderReader
from popsync.identity import HeaderDigest, Stored, Verdict, digest_headers, judge
from popsync.ledger import (
    FetchIntent,
    Key,
    Ledger,
    LedgerRow,
    PollCounts,
    PollRow,
    Skipped,
)
from popsync.options import TlsMode
from popsync.plan import (
    CUT_OFF,
    Delete,
    Fetch,
    Plan,
    Policy,
    ServerMessage,
    join_listings,
    match_remaps,
    needs_size,
    plan,
    remap_candidates,
    unknown_sizes,
)
from popsync.reconcile import (
    as_delivered,
    pending,
    pending_names,
    recovered,
    split_already_held,
)
from popsync.session import RetrRequest, Session, SessionOptions
from popsync.textfmt import format_size

if TYPE_CHECKING:
    from popsync.ledger.rowcache import KnownRows
    from popsync.refetch import Lost

log = logging.getLogger("popsync.sync")
steps = logging.getLogger("popsync.steps")  # -v (popsync.logs)

#: A body may exceed its LIST size by half as much again plus this much
#: (servers that count a line end as one octet report less than arrives).
SIZE_SLACK = 64 * 1024
#: Cap for a message whose size the server did not tell and no limit is set.
HARD_CAP = 1 << 30
#: Up to this many sizes are asked with pipelined LIST n, above it one LIST.
SCAN_ONE_BY_ONE = 64
#: Sessions one poll may open: a message cut off for running past its size
#: is skipped and the poll goes on with a fresh session.
MAX_SESSIONS = 4
#: After a cut-off the server may still hold the maildrop lock of the
#: session popsync dropped; a reconnect answered ``[IN-USE]`` waits this long
#: (seconds, growing) before each further try.
IN_USE_WAITS = (0.5, 1.0, 2.0)

#: Why ``--refetch`` does nothing for an account that delivers elsewhere.
REFETCH_NEEDS_MAILDIR = "--refetch needs a maildir target"
#: Why a lost copy is not refetched when the server's TOP for it lied.
TOP_PAST_SIZE = "its TOP ran past the size the server announced, so it cannot be compared"

Progress = Callable[[int, int, int], None]  # (messages done, messages planned, bytes)


@dataclass
class PollReport:
    """The outcome of one poll, for the summary line, the daemon and ``status``."""

    account: str
    ok: bool = False
    error: str | None = None
    temporary: bool | None = None
    counts: PollCounts = field(default_factory=PollCounts)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    #: RFC 2449 §6.5 LOGIN-DELAY the server announced, if any (seconds).
    login_delay: int | None = None
    #: The error object, for callers that classify by type.
    exception: PopsyncError | None = None
    #: A stop request cut the poll short (it still ended cleanly with QUIT).
    interrupted: bool = False
    #: With ``--refetch``: lost copies delivered again (None: not asked).
    refetched: int | None = None


def format_summary(report: PollReport) -> str:
    """What a completed poll did, as the summary line and the daemon's log show it."""
    c = report.counts
    return (
        f"{c.listed} on server, {c.new} new, {c.fetched} fetched ({format_size(c.bytes)}), "
        f"{c.deleted} deleted, {c.skipped} skipped, "
        + (f"{c.remapped} remapped, " if c.remapped else "")
        + (f"{c.deferred} deferred (fetch_limit), " if c.deferred else "")
        + (f"{report.refetched} refetched, " if report.refetched is not None else "")
        + f"{report.seconds:.1f} s"
    )


def body_limit(size: int | None, max_message_size: int | None) -> int:
    """How many bytes RETR may deliver before the body is cut off (I4)."""
    limits = [HARD_CAP]
    if size is not None:
        limits.append(size + size // 2 + SIZE_SLACK)
    if max_message_size is not None:
        limits.append(max_message_size)
    return min(limits)


def read_headers(
    session: Session, messages: Sequence[ServerMessage]
) -> dict[int, HeaderDigest | None]:
    """``TOP n 0`` for each message, pipelined, each bounded by its LIST size
    (:func:`body_limit`): the header digests by message number, None where
    the server refused TOP.  Raises as :meth:`Session.retrieve` does."""
    reader = HeaderReader()
    session.retrieve(
        (RetrRequest(m.msg, body_limit(m.size, None), top=0) for m in messages), reader
    )
    return reader.digests


def session_options(account: Account) -> SessionOptions:
    """The session settings of *account*, its time limits included: ``timeout``
    per read and status line, ``min_rate`` for listings and bodies, and
    ``poll_timeout`` for the whole session (see :mod:`popsync.pace`)."""
    return SessionOptions(
        host=account.host,
        port=account.port,
        username=account.username,
        tls=account.tls,
        ssl_context=None if account.tls == TlsMode.NONE else account.ssl_context(),
        auth=account.auth,
        allow_plaintext=account.allow_plaintext,
        timeout=account.timeout,
        max_line=account.max_line_length,
        pipeline_window=account.pipeline_window,
        poll_timeout=account.poll_timeout,
        min_rate=account.min_rate,
        account=account.name,
    )


def plan_warnings(the_plan: Plan) -> list[str]:
    """What a plan says the user should know, once."""
    out = []
    if the_plan.new_ambiguous:
        shown = ", ".join(escape_server_text(uid) for uid in sorted(the_plan.new_ambiguous)[:3])
        out.append(
            f"server lists {len(the_plan.new_ambiguous)} unique-id(s) for more than one "
            f"message ({shown}), against RFC 1939 §7: each copy is fetched once and none "
            "of them is ever deleted by popsync (see README, 'Duplicate unique-ids')"
        )
    if the_plan.waiting:
        out.append(f"{len(the_plan.waiting)} message(s) have no unique-id yet; next poll")
    out.extend(
        f"message {s.message.msg} ({s.message.size} bytes) skipped: {s.reason}"
        for s in the_plan.skip
    )
    return out


def login_secret(account: Account, state_dir: Path, *, fresh: bool = False) -> str:
    """The password, or for an ``oauth2`` account a valid access token (refreshed
    now if it is about to expire, or if *fresh*: call with the account's lock
    held, see :func:`popsync.oauth.access.access_token`)."""
    if account.oauth2 is None:
        return account.secret()
    from popsync.oauth.access import access_token

    return access_token(account, state_dir, fresh=fresh)


def plan_counts(the_plan: Plan, remapped: int) -> dict[str, int]:
    """What a plan will do, counted: messages and octets to fetch, to skip,
    DELEs (of mail delivered earlier, each still to be confirmed, and of mail
    fetched now, once durable), and messages remapped to known rows."""
    return {
        "fetch": len(the_plan.fetch),
        "bytes": sum(f.message.size or 0 for f in the_plan.fetch),
        "skip": len(the_plan.skip),
        "delete": len(the_plan.delete) + sum(f.delete_after for f in the_plan.fetch),
        "remap": remapped,
    }


def log_plan(account: str, the_plan: Plan, remapped: int) -> None:
    """The plan's counts, one INFO line (``-v``)."""
    counts = plan_counts(the_plan, remapped)
    steps.info(
        "%s: plan: fetch %d (%s), skip %d, delete %d, remap %d",
        account,
        counts["fetch"],
        format_size(counts["bytes"]),
        counts["skip"],
        counts["delete"],
        counts["remap"],
        extra={
            "account": account,
            "event": "plan",
            "new": counts["fetch"],
            "bytes": counts["bytes"],
            "skipped": counts["skip"],
            "deleted": counts["delete"],
            "remapped": counts["remap"],
        },
    )


@dataclass(frozen=True, slots=True)
class Listing:
    """The server's listing as the plan sees it."""

    messages: list[ServerMessage]
    waiting: list[int]


class Poll:
    """One poll of one account: :meth:`run` opens sessions, :meth:`session`
    is the algorithm of the module docstring."""

    def __init__(
        self,
        account: Account,
        ledger: Ledger,
        target: Target,
        report: PollReport,
        *,
        now: Callable[[], float],
        progress: Progress | None,
        should_stop: Callable[[], bool],
        state_dir: Path,
        refetch: bool = False,
        known: KnownRows | None = None,
    ) -> None:
        self.account = account
        self.state_dir = state_dir
        self.name = account.name
        self.ledger = ledger
        self.target = target
        self.report = report
        self.now = now
        self.progress = progress
        self.should_stop = should_stop
        self.totals = FetchOutcome()
        self.skipped = 0  # cut off while fetching
        self.remapped = 0  # known messages found under new unique-ids
        #: Unique-ids whose ``TOP n 0`` ran past their size: not compared again
        #: this poll (the message is fetched, and judged, like any new one).
        self.top_cut_off: set[bytes] = set()
        #: ``--refetch`` asked and not yet done (done once per poll).
        self.refetch_asked = self.refetch_pending = refetch
        self.reopened: list[Key] = []
        #: The daemon's rows kept between polls (None: read them each time).
        self.known = known

    def run(self, open_session: Callable[[SessionOptions], Session]) -> None:
        """One session, or a few: a message cut off for running past its size
        is skipped and the poll goes on with a fresh session (the cut-off
        leaves the old one mid-body), at most :data:`MAX_SESSIONS` times."""
        # A bad secret source fails before connecting.
        secret = login_secret(self.account, self.state_dir)
        try:
            self.sessions(open_session, secret)
        except ServerError as exc:
            if self.account.oauth2 is None or exc.command != "AUTH" or exc.temporary:
                raise
            # A provider may revoke an access token before it expires (a
            # password change, a policy): one fresh token, one more try.
            log.info("%s: the server refused the OAuth2 access token; refreshing it", self.name)
            self.sessions(open_session, login_secret(self.account, self.state_dir, fresh=True))
        if self.refetch_asked:
            self.report.refetched = self.refetched()
        if self.totals.failed:
            raise _Incomplete(self.totals.failed)

    def sessions(self, open_session: Callable[[SessionOptions], Session], secret: str) -> None:
        """:meth:`session`, again after a cut-off (see :meth:`run`)."""
        for attempt in range(MAX_SESSIONS):
            before = (self.skipped, len(self.top_cut_off))
            try:
                self.session(open_session, secret, again=attempt > 0)
            except BodyLimitExceeded:
                # Go on only if the culprit is now skipped, or left out of
                # the remap step (not, say, a TOP before a DELE).
                if before == (self.skipped, len(self.top_cut_off)) or attempt == MAX_SESSIONS - 1:
                    raise
                continue
            break

    # -- the algorithm -----------------------------------------------------------

    def session(
        self, open_session: Callable[[SessionOptions], Session], secret: str, *, again: bool
    ) -> None:
        gate = DeleGate()
        # 1: the ledger is read while the server logs us in and lists its
        # mail: for a large account both take about as long.  Leaving the
        # block waits for the read, so nothing of a failed poll runs on.
        reader = ThreadPoolExecutor(1, thread_name_prefix="popsync-ledger-read")
        loading = reader.submit(self.load)
        with reader, self.connect(open_session, secret, again=again) as session:
            uidl = session.uidl()  # 2
            rows = self.recover(loading.result())  # 1
            now = self.now()
            policy = Policy(
                self.account.delete_after_days,
                self.account.max_message_size,
                now,
                fetch_limit=self.budget(),
            )
            listing = self.listing(session, uidl, rows, policy)
            rows = self.remap(session, listing.messages, rows)  # 2b
            rows = self.refetch_lost(session, listing.messages, rows)  # 2c
            the_plan = plan(listing.messages, rows, policy, listing.waiting)  # 3
            log_plan(self.name, the_plan, self.remapped)
            self.note(the_plan)
            reused = self.confirm_deletes(session, the_plan.delete, gate)  # 4
            # A message under a reused unique-id is fetched now even past
            # fetch_limit: its row is retired, so deferring it would lose
            # the fresh name that keeps it apart from the retired copy.
            fetches = self.claim((*the_plan.fetch, *reused), now)  # 5
            self.fetch(session, fetches, gate)  # 6
            failpoints.failpoint("after_dele")
            self.count(the_plan, deleted=0)
            session.quit()  # 7
            failpoints.failpoint("after_quit")
        self.ledger.mark_deleted(self.name, [*gate.accepted, *the_plan.gone], self.now())
        self.count(the_plan, deleted=len(gate.accepted))
        steps.info(
            "%s: DELE: %d accepted, %d refused; removed by the server at QUIT",
            self.name,
            len(gate.accepted),
            len(gate.refused),
            extra={"account": self.name, "event": "dele", "deleted": len(gate.accepted)},
        )
        for msg, text in gate.refused:
            self.warn(f"DELE {msg} refused: {text}")
        self.touch(listing.messages, rows, now)

    def budget(self) -> int | None:
        """What is left of ``fetch_limit`` for this session: a poll that goes on
        in a fresh session after a cut-off counts what earlier sessions took."""
        limit = self.account.fetch_limit
        if limit is None:
            return None
        return max(0, limit - self.totals.fetched - self.skipped)

    # -- 1. recovery -------------------------------------------------------------

    def load(self) -> dict[Key, PollRow]:
        """The account's rows as the poll compares them: slim, whole only
        where still open (:meth:`Ledger.poll_rows`); in the daemon, the rows
        it kept if the ledger's generation says they are current
        (:class:`popsync.ledger.rowcache.KnownRows`).  Never modified."""
        # A policy that never deletes never asks when mail was delivered.
        deletes = self.account.delete_after_days is not None
        if self.known is not None:
            return self.known.rows(self.ledger, self.name, self.now(), delivery_times=deletes)
        return self.ledger.poll_rows(self.name, self.now(), delivery_times=deletes)

    def recover(self, rows: dict[Key, PollRow]) -> dict[Key, PollRow]:
        """Record as delivered the ``fetching`` rows whose copy the target holds."""
        opened = {key: row.detail for key, row in rows.items() if row.detail is not None}
        names = pending_names(opened)
        if not names:
            return rows
        kind = self.target.kind
        found = recovered(names, self.target.recover(pending(opened, names)), kind)
        if not found:
            return rows
        self.ledger.mark_delivered(self.name, found)
        log.info("%s: recovered %d message(s) delivered before a crash", self.name, len(found))
        return self.load()

    # -- 2. session and listing -----------------------------------------------------

    def connect(
        self, open_session: Callable[[SessionOptions], Session], secret: str, *, again: bool
    ) -> Session:
        """Open a session and log in.  A reconnect after a cut-off waits out
        ``[IN-USE]``: the server may not have noticed the dropped session yet."""
        for wait in (*IN_USE_WAITS, None) if again else (None,):
            session = open_session(session_options(self.account))
            try:
                self.login(session, secret)
            except ServerError as exc:
                session.abort()
                if wait is None or exc.code is None or exc.code.top != "IN-USE":
                    raise
            except BaseException:
                session.abort()
                raise
            else:
                return session
            time.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def login(self, session: Session, secret: str) -> None:
        # LOGIN-DELAY before login is the largest any user gets (RFC 2449
        # §6.5); kept even if the login itself is refused for it.
        self.report.login_delay = session.capabilities.login_delay
        session.login(secret)
        self.report.login_delay = session.capabilities.login_delay
        if session.capabilities.expire_zero and self.account.delete_after_days is None:
            self.warn(
                "server advertises EXPIRE 0: it may delete every message popsync "
                "retrieves, so mail cannot be left on this server (RFC 2449 §6.7)"
            )

    def listing(
        self,
        session: Session,
        uidl: list[tuple[int, bytes]],
        rows: dict[Key, PollRow],
        policy: Policy,
    ) -> Listing:
        """The UIDL listing, and sizes only where the plan uses them: nothing
        for a poll with nothing to do, ``LIST n`` for a few, the whole LIST
        for many."""
        unsized, _ = join_listings(uidl, ())
        # --refetch compares sizes of delivered mail too: the whole LIST.
        wanted = (
            [m.msg for m in unsized] if self.refetch_pending else needs_size(unsized, rows, policy)
        )
        if not wanted:
            return Listing(unsized, [])
        scan = session.scan(wanted) if len(wanted) <= SCAN_ONE_BY_ONE else session.scan()
        messages, waiting = join_listings(uidl, scan)
        return Listing(messages, waiting)

    # -- 2b. unique-ids that changed ---------------------------------------------------

    def remap(
        self, session: Session, messages: list[ServerMessage], rows: dict[Key, PollRow]
    ) -> dict[Key, PollRow]:
        """Recognise known mail that the server now lists under new unique-ids.

        Only when the listing holds unknown unique-ids *and* delivered rows
        of the same size have vanished from it (:func:`popsync.plan.remap_candidates`)
        is ``TOP n 0`` sent, pipelined, for those candidates; a candidate
        whose stable header digest matches exactly one such row takes that
        row over (:meth:`Ledger.remap`) and is not fetched.  A server that
        refuses TOP, or any ambiguity, leaves the message to be fetched.
        Whole rows are read only of the sizes of unknown messages.
        """
        trusted = [m for m in messages if m.uid not in self.top_cut_off]
        sizes = unknown_sizes(trusted, rows)
        if not sizes:
            return rows
        candidates = remap_candidates(trusted, rows, self.ledger.remap_rows(self.name, sizes))
        if not candidates:
            return rows
        by_msg = {m.msg: m for m in messages}
        try:
            tops = read_headers(session, [by_msg[msg] for msg in sorted(candidates)])
        except BodyLimitExceeded as exc:
            # A header section longer than the whole message: a lying server.
            # That one is fetched like a new message (and cut off if its body
            # lies too); the next session compares the others.
            culprit = by_msg[exc.msg]
            self.top_cut_off.add(culprit.uid)
            self.warn(
                f"message {culprit.msg} (unique-id {escape_server_text(culprit.uid)}): TOP ran "
                "past the size the server announced; not compared with known mail"
            )
            raise
        digests = {msg: d.stable if d is not None else None for msg, d in tops.items()}
        found = match_remaps(messages, candidates, digests)
        if not found:
            return rows
        pairs = [(r.row.key, (r.message.uid, r.message.occurrence)) for r in found]
        self.ledger.remap(self.name, pairs, self.now())
        self.remapped += len(found)
        shown = ", ".join(
            f"{escape_server_text(old)} -> {escape_server_text(new)}"
            for (old, _), (new, _) in pairs[:3]
        )
        more = f" and {len(pairs) - 3} more" if len(pairs) > 3 else ""
        log.info(
            "%s: the server renumbered %d known message(s) (%s%s); not fetched again",
            self.name,
            len(found),
            shown,
            more,
        )
        return self.load()

    # -- 2c. lost copies (--refetch) ---------------------------------------------------

    def refetch_lost(
        self, session: Session, messages: list[ServerMessage], rows: dict[Key, PollRow]
    ) -> dict[Key, PollRow]:
        """Reopen the delivered rows whose copy is missing or damaged and whose
        message the server still lists as the one stored, so the plan fetches
        them again (the order and the crash cases: :mod:`popsync.refetch`)."""
        if not self.refetch_pending:
            return rows
        if self.target.kind != "maildir":  # the command line refuses it first
            self.refetch_pending = False
            self.warn(REFETCH_NEEDS_MAILDIR)
            return rows
        # Imported here: popsync.refetch builds on popsync.verify, which uses this module.
        from popsync import refetch
        from popsync.verify import Finder

        # --refetch checks every delivered copy: whole rows, this once.
        whole = self.ledger.rows(self.name)
        lost = refetch.lost_copies(whole, Finder(self.target.kind, self.target.recover))
        del whole
        listed, gone = refetch.on_server(lost, messages)
        # A message whose TOP ran past its size (an earlier session of this
        # poll) cannot be compared: not refetched.
        liars = [(item, TOP_PAST_SIZE) for item, m in listed if m.uid in self.top_cut_off]
        listed = [(item, m) for item, m in listed if m.uid not in self.top_cut_off]
        tops = self.lost_headers(session, [m for _, m in listed])
        confirmed, refused = refetch.confirm(listed, tops)
        refused += liars
        now = self.now()
        reopen = [
            (
                item.row.key,
                item.row.maildir_name or "",
                refetch.fresh_name(self.name, item.row, now),
            )
            for item, _ in confirmed
        ]
        self.ledger.reopen(self.name, reopen, now)
        failpoints.failpoint("after_reopen")
        self.refetch_pending = False
        self.reopened = [key for key, _, _ in reopen]
        self.tell_lost(confirmed, gone, refused)
        return self.load() if reopen else rows

    def lost_headers(
        self, session: Session, messages: list[ServerMessage]
    ) -> dict[int, HeaderDigest | None]:
        """``TOP n 0`` of the lost copies' messages.  One whose TOP runs past
        its size ends the session (the poll goes on in a fresh one, without
        that message: :meth:`run`)."""
        if not messages:
            return {}
        try:
            return read_headers(session, messages)
        except BodyLimitExceeded as exc:
            self.top_cut_off.update(m.uid for m in messages if m.msg == exc.msg)
            raise

    def tell_lost(
        self,
        confirmed: Sequence[tuple[Lost, ServerMessage]],
        gone: Sequence[Lost],
        refused: Sequence[tuple[Lost, str]],
    ) -> None:
        """One line per damaged file left beside its new copy, per reason a
        copy is not refetched, and for the copies the server no longer holds."""
        for item, _ in confirmed:
            if item.held is not None:
                self.warn(
                    f"unique-id {escape_server_text(item.row.uid)}: damaged copy {item.detail}; "
                    "fetching it again under a new name (the damaged file is left as it is)"
                )
        by_reason: dict[str, list[bytes]] = {}
        for item, why in refused:
            by_reason.setdefault(why, []).append(item.row.uid)
        if gone:
            by_reason["no longer on the server"] = [item.row.uid for item in gone]
        for why, uids in by_reason.items():
            shown = ", ".join(escape_server_text(uid) for uid in uids[:3])
            more = f" and {len(uids) - 3} more" if len(uids) > 3 else ""
            self.warn(f"{len(uids)} lost copy(ies) not refetched ({shown}{more}): {why}")

    def refetched(self) -> int:
        """How many rows reopened by this poll are delivered again."""
        if not self.reopened:
            return 0
        rows = self.ledger.rows_by_key(self.name, self.reopened)
        return sum(
            1 for key in self.reopened if (row := rows.get(key)) and row.state == "delivered"
        )

    def note(self, the_plan: Plan) -> None:
        for text in plan_warnings(the_plan):
            self.warn(text)
        if the_plan.skip:
            self.ledger.mark_skipped(
                self.name,
                [
                    Skipped(m.uid, m.occurrence, m.size or 0, s.reason, self.now())
                    for s in the_plan.skip
                    if (m := s.message)
                ],
            )

    # -- 4. confirming deletions --------------------------------------------------------

    def confirm_deletes(
        self, session: Session, deletes: Sequence[Delete], gate: DeleGate
    ) -> list[Fetch]:
        """Allow the due DELEs that are confirmed; return reused unique-ids to fetch.

        ``TOP n 0`` is sent even when CAPA does not list it (most servers
        have it; RFC 1939 §7); ``-ERR`` means "cannot confirm", never "go
        ahead".  What cannot be confirmed stays on the server, reported once
        per message and reason.  A unique-id that now names another message
        (headers and size both differ) is retired in the ledger and its
        message fetched as new.
        """
        if not deletes:
            return []
        # The plan saw slim rows: the judgement needs the whole ones.  A row
        # not found (none is: the account is locked) is simply not deleted.
        whole = self.ledger.rows_by_key(self.name, [d.key for d in deletes])
        due = [(d, whole[d.key]) for d in deletes if d.key in whole]
        tops = read_headers(session, [d.message for d, _ in due])
        reused: list[Fetch] = []
        withheld: list[tuple[Key, str | None]] = []
        # Rows of an older popsync recorded less: measure their copies, at once.
        older = [row.maildir_name for _, row in due if stored_of(row) is None]
        asks = [Pending(name, None) for name in older if name is not None]
        held = {h.asked: h for h in self.target.recover(asks)}
        for item, row in due:
            msg = item.message.msg
            assert item.message.size is not None  # plan() only offers sized messages
            stored = stored_of(row) or stored_from(row, held.get(row.maildir_name or ""))
            verdict = judge(stored, item.message.size, tops.get(msg))
            if verdict.verdict is Verdict.SAME:
                gate.allow_confirmed(msg, row.key)
                if row.withheld is not None:
                    withheld.append((row.key, None))
            elif verdict.verdict is Verdict.OTHER:
                self.warn(
                    f"unique-id {escape_server_text(row.uid)} now names another message "
                    f"({verdict.reason}); the server reused it: fetching it as a new message"
                )
                reused.append(self.refetch(item, row))
            elif row.withheld != verdict.reason:
                self.warn(
                    f"message {msg} (unique-id {escape_server_text(row.uid)}) "
                    f"is due for deletion but not deleted: {verdict.reason}"
                )
                withheld.append((row.key, verdict.reason))
        self.ledger.mark_withheld(self.name, withheld)
        self.ledger.retire(self.name, [(f.message.uid, f.message.occurrence) for f in reused])
        return reused

    def refetch(self, item: Delete, row: LedgerRow) -> Fetch:
        """A plan item for the new message under a reused unique-id (*row* is
        its whole row), with a name of its own (the hash name of uid and
        occurrence is the retired copy's)."""
        fresh = message_name(
            self.name, row.uid + b" after %d" % row.id, row.occurrence, int(self.now())
        )
        return Fetch(item.message, existing_name=fresh, delete_after=False)

    # -- 5. names ----------------------------------------------------------------------

    def claim(self, fetch: Sequence[Fetch], now: float) -> list[tuple[Fetch, str]]:
        """Choose and commit every name before any RETR.

        Names derive from a hash of account, unique-id and occurrence, so no
        server byte reaches a path and a crashed fetch is found again.  A
        message the target already holds under its name (a lost or rebuilt
        ledger) is recorded as delivered, not fetched.
        """
        if not fetch:
            return []
        named = [(item, item.existing_name or self.name_for(item, now)) for item in fetch]
        fresh = [name for item, name in named if item.existing_name is None]
        asks = [Pending(name, None) for name in fresh]
        to_fetch, already = split_already_held(named, self.target.recover(asks))
        intents = [
            FetchIntent(m.uid, m.occurrence, m.size or 0, name, now)
            for item, name in to_fetch
            if (m := item.message)
        ] + [
            FetchIntent(m.uid, m.occurrence, m.size or 0, held.name, now)
            for item, held in already
            if (m := item.message)
        ]
        self.ledger.begin_fetch(self.name, intents)
        if already:
            self.ledger.mark_delivered(
                self.name,
                [
                    as_delivered((i.message.uid, i.message.occurrence), h, self.target.kind)
                    for i, h in already
                ],
            )
            self.warn(f"{len(already)} message(s) were already delivered; not fetched again")
        failpoints.failpoint("after_begin_fetch")
        return to_fetch

    def name_for(self, item: Fetch, now: float) -> str:
        m = item.message
        return message_name(self.name, m.uid, m.occurrence, int(now))

    # -- 6. fetching -------------------------------------------------------------------

    def fetch(self, session: Session, fetches: list[tuple[Fetch, str]], gate: DeleGate) -> None:
        """RETR every planned message into the target; DELEs ride along once allowed."""
        limit = self.account.max_message_size
        fetcher = Fetcher(
            self.name,
            self.target,
            self.ledger,
            gate,
            fetches,
            limit=lambda item: body_limit(item.message.size, limit),
            now=self.now,
            stopped=self.stopped,
            progress=self.progressed(len(fetches)),
            received=self.received_line if self.account.received_header else None,
        )
        try:
            session.retrieve(fetcher.requests(), fetcher)
            fetcher.commit()
            session.retrieve((), fetcher)  # the DELEs the last commit allowed
        except BaseException as exc:
            # Bodies that arrived whole become durable and recorded, so the
            # next poll needs no recovery -- but no DELE goes out on a broken
            # session.  If that fails too, the first error is the one to
            # report; the next poll's recovery finds whatever was committed.
            victim = fetcher.in_flight()
            fetcher.abandon()
            with contextlib.suppress(PopsyncError):
                fetcher.commit(allow_deletes=False)
            with contextlib.suppress(PopsyncError):
                self.blame(victim, exc)
            raise
        finally:
            self.merge(fetcher.outcome)

    def received_line(self) -> bytes:
        """One ``Received:`` header field (RFC 5322 §3.6.7) naming the server,
        the account and the time, folded to stay under 78 characters a line."""
        host = (
            self.account.host.encode("idna")
            if not self.account.host.isascii()
            else (self.account.host.encode("ascii"))
        )
        name = self.name.encode("ascii")
        stamp = email.utils.formatdate(self.now(), localtime=True).encode("ascii")
        return b"Received: from %s\n\tby popsync (account %s);\n\t%s\n" % (host, name, stamp)

    def merge(self, outcome: FetchOutcome) -> None:
        self.totals.fetched += outcome.fetched
        self.totals.bytes += outcome.bytes
        self.totals.failed += outcome.failed
        if outcome.short:
            self.ledger.record_attempts(self.name, outcome.short, self.now())

    def blame(self, victim: Fetch | None, exc: BaseException) -> None:
        """Charge a broken session to the message in flight.

        Cut off for running past its limit: skipped from now on (while the
        server lists it with the same size).  Any other failure counts one
        attempt; messages that failed are fetched after the others next time,
        so none can starve the account.
        """
        if victim is None:
            return
        m = victim.message
        if isinstance(exc, BodyLimitExceeded) and exc.msg == m.msg:
            limit = self.account.max_message_size
            why = f"{CUT_OFF} ({m.size} octets)" if m.size is not None else CUT_OFF
            if limit is not None and (m.size is None or m.size <= limit):
                why += f" or max_message_size ({limit} bytes)"
            self.ledger.mark_skipped(
                self.name, [Skipped(m.uid, m.occurrence, m.size or 0, why, self.now())]
            )
            self.skipped += 1
            self.warn(
                f"message {m.msg} (unique-id {escape_server_text(m.uid)}) skipped: {why}; "
                "it stays on the server"
            )
            return
        self.ledger.record_attempts(self.name, [(m.uid, m.occurrence)], self.now())

    def stopped(self) -> bool:
        if self.should_stop():
            if not self.report.interrupted:
                self.report.interrupted = True
                self.warn("stop requested: finishing the messages in flight, then QUIT")
            return True
        return False

    def progressed(self, planned: int) -> Callable[[int, int], None] | None:
        progress = self.progress
        if progress is None:
            return None
        base_count, base_bytes = self.totals.fetched, self.totals.bytes
        return lambda done, size: progress(base_count + done, planned, base_bytes + size)

    # -- 7. after QUIT -----------------------------------------------------------------

    def touch(self, messages: list[ServerMessage], rows: dict[Key, PollRow], now: float) -> None:
        """Refresh ``last_seen`` of the listed rows last seen over
        :data:`popsync.ledger.SEEN_REFRESH` ago (judged as the rows were read): a poll of a mailbox
        seen within a day writes nothing."""
        # Usually no row is stale: one pass over the rows, none over the listing.
        old = {key for key, row in rows.items() if row.stale}
        if not old:
            return
        stale = [(uid, occ) for _, uid, occ, _ in messages if (uid, occ) in old]
        if stale:
            self.ledger.touch_seen(self.name, stale, now)

    # -- the report ----------------------------------------------------------------------

    def count(self, the_plan: Plan, *, deleted: int) -> None:
        self.report.counts = PollCounts(
            listed=the_plan.listed,
            # Rows reopened by --refetch are planned like unfinished fetches,
            # but they are not new mail.
            new=max(0, len(the_plan.fetch) + the_plan.deferred - len(self.reopened)),
            fetched=self.totals.fetched,
            deleted=deleted,
            skipped=len(the_plan.skip) + self.skipped,
            bytes=self.totals.bytes,
            remapped=self.remapped,
            deferred=the_plan.deferred,
        )

    def warn(self, text: str) -> None:
        warn(self.report, text)


def warn(report: PollReport, text: str) -> None:
    """A warning for the user: in the report (the summary, ``status``) and the log."""
    report.warnings.append(text)
    log.warning("%s: %s", report.account, text)


def stored_of(row: LedgerRow) -> Stored | None:
    """What :func:`popsync.identity.judge` needs of a ledger row; None for a
    row of an older popsync, which did not record it all."""
    if (
        row.wire_size is None
        or row.stored_size is None
        or row.stable_sha256 is None
        or row.mutable_octets is None
        or row.mutable_lines is None
    ):
        return None
    return Stored(
        row.server_size,
        row.wire_size,
        row.stored_size,
        row.stable_sha256,
        row.mutable_octets,
        row.mutable_lines,
    )


def stored_from(row: LedgerRow, held: Held | None) -> Stored:
    """The same, measured from the copy the target holds -- if it still holds
    it with the recorded hash; else a record :func:`judge` will not confirm."""
    if held is None or held.sha256 != row.sha256:
        return Stored(row.server_size, None, row.stored_size or 0, "", 0, 0)
    headers = digest_headers(held.header_section)
    return Stored(
        row.server_size,
        held.wire_size,
        held.size,
        headers.stable,
        headers.mutable_octets,
        headers.mutable_lines,
    )


class _Incomplete(PopsyncError):
    """Some messages could not be fetched; the poll did not complete."""

    temporary = True

    def __init__(self, failures: list[str]) -> None:
        shown = "; ".join(failures[:3]) + (
            f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
        )
        super().__init__(f"{len(failures)} message(s) not fetched: {shown}")


def run_account(
    account: Account,
    ledger: Ledger,
    state_dir: Path,
    *,
    now: Callable[[], float] = time.time,
    lock_wait: bool | float = False,
    progress: Progress | None = None,
    session_factory: Callable[[SessionOptions], Session] = Session.open,
    should_stop: Callable[[], bool] = lambda: False,
    refetch: bool = False,
    known: KnownRows | None = None,
) -> PollReport:
    """Poll *account* once; never raises for faults of the network, server or disk.

    *should_stop* is asked between messages; once it says True no further
    RETR is sent, and the poll finishes what is in flight and QUITs cleanly.
    With *refetch* (``sync --refetch``, Maildir targets only) the poll also
    fetches again the delivered messages whose copy is missing or damaged
    (:mod:`popsync.refetch`); :attr:`PollReport.refetched` says how many.
    With *known* (the daemon) the account's rows are kept between polls and
    validated against the ledger's generation at each one.
    """
    report = PollReport(account.name)
    started = time.monotonic()
    poll_id: int | None = None
    try:
        with ExitStack() as stack:
            stack.enter_context(ledger.account_lock(state_dir, account.name, wait=lock_wait))
            if known is not None:
                stack.enter_context(known.watching(ledger, account.name))
            poll_id = ledger.start_poll(account.name, now())
            target = stack.enter_context(
                open_target(account, state_dir=state_dir, warn=lambda text: warn(report, text))
            )
            poll = Poll(
                account,
                ledger,
                target,
                report,
                now=now,
                progress=progress,
                should_stop=should_stop,
                state_dir=state_dir,
                refetch=refetch,
                known=known,
            )
            poll.run(session_factory)
        report.ok = True
    except PopsyncError as exc:
        report.error = str(exc)
        report.temporary = exc.temporary
        report.exception = exc
        if isinstance(exc, ServerError | TransportError | RemoteProtocolError | DeliveryError):
            log.debug("%s: poll failed", account.name, exc_info=True)
    except Exception as exc:  # a bug of ours: one line here, the other accounts go on
        report.error = f"internal error: {type(exc).__name__}: {exc} (run with -v for details)"
        report.temporary = True
        log.debug("%s: internal error", account.name, exc_info=True)
    finally:
        report.seconds = time.monotonic() - started
        if poll_id is not None:
            _finish_poll(ledger, poll_id, report, now())
    return report


def _finish_poll(ledger: Ledger, poll_id: int, report: PollReport, at: float) -> None:
    try:
        ledger.finish_poll(
            poll_id,
            finished_at=at,
            result="ok" if report.ok else "error",
            error=report.error,
            temporary=report.temporary,
            counts=report.counts,
            next_poll_at=None,
        )
    except PopsyncError as exc:  # the poll's own outcome matters more
        report.warnings.append(f"could not record the poll: {exc}")
        log.warning("%s: could not record the poll: %s", report.account, exc)


__all__ = [
    "PollReport",
    "body_limit",
    "format_summary",
    "login_secret",
    "run_account",
    "session_options",
]
