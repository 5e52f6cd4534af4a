"""One poll of one account, in the safe order of DESIGN §4.

:func:`run_account` never raises for a network, server, storage or config
fault: it returns a :class:`PollReport` that says what happened and whether
a retry may help (``temporary``).  The order of side effects is the
product's promise, so here it is once, in full:

1. Take the account's lock (a second popsync waits or reports "busy").
2. Recovery: a ledger row ``fetching`` whose file is already in ``new/`` or
   ``cur/`` (a crash after ``link()``, W3) becomes ``delivered``; nothing is
   fetched twice.
3. Connect, TLS, authenticate (:mod:`popsync.session`); UIDL and LIST.
4. :func:`popsync.plan.plan` decides -- pure -- what to fetch, skip, DELE.
   A new message whose hash name is already in the Maildir (a lost ledger)
   is recorded as delivered, not fetched.
5. Commit the chosen Maildir names (``fetching``) in one transaction.
6. RETR, pipelined; each body streams into ``tmp/`` and is fsynced, then
   ``link()``ed into ``new/``.  Per batch (count, bytes or time): fsync
   ``new/``, then one ledger commit marking the batch ``delivered``, and
   only then queue the batch's DELEs (``delete_after_days: 0``).  No DELE
   ever precedes the commit that covers its message (I1).
7. DELE what the plan found due; QUIT; only after ``+OK`` to QUIT are the
   rows marked ``deleted`` -- the server deletes at QUIT (RFC 1939 §6).  A
   lost QUIT reply leaves them ``delivered``; the next listing settles it.

On any error the connection is dropped without QUIT, so the server deletes
nothing of this session (RFC 1939 §6); what was delivered and committed
stays, and its DELE is simply repeated next time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from popsync import failpoints
from popsync.config import Account
from popsync.deliver.maildir import (
    DeliveryPipeline,
    Maildir,
    MaildirIndex,
    TmpMessage,
    delivery_hash,
    name_hash,
    unique_name,
)
from popsync.errors import (
    BodyLimitExceeded,
    DeliveryError,
    PopsyncError,
    RemoteProtocolError,
    ServerError,
    TransportError,
    escape_server_text,
)
from popsync.identity import (
    HEADER_CAP,
    HeaderDigest,
    HeaderHasher,
    Stored,
    Verdict,
    digest_headers,
    is_short,
    judge,
)
from popsync.ledger import (
    SEEN_REFRESH,
    Delivered,
    FetchIntent,
    Ledger,
    LedgerRow,
    PollCounts,
    Skipped,
)
from popsync.locks import account_lock
from popsync.options import TlsMode
from popsync.plan import CUT_OFF, Delete, Fetch, Plan, Policy, join_listings, needs_size, plan
from popsync.pop3 import BodyData, Dele, EndOfBody, Err, Ok, Retr, Top
from popsync.session import Reply, RetrRequest, Session, SessionOptions
from popsync.textfmt import format_size
from popsync.transport import make_ssl_context

log = logging.getLogger("popsync.sync")

#: Durability is grouped: one directory fsync and one ledger commit per batch.
BATCH_MESSAGES = 64
BATCH_BYTES = 16 * 1024 * 1024
BATCH_SECONDS = 1.0
#: A body may exceed its LIST size by this much (servers count LF as one
#: octet, or misreport slightly -- PROTOCOL-NOTES §1 "Size semantics").
SIZE_SLACK = 64 * 1024
#: Cap for a message whose size the server did not tell and no limit is set.
HARD_CAP = 1 << 30
#: Up to this many sizes are asked with pipelined LIST n, above it one LIST.
SCAN_ONE_BY_ONE = 64
#: Sessions one poll may open: a message cut off for running past its size
#: is skipped and the poll goes on with a fresh session.
MAX_SESSIONS = 4

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


def format_summary(report: PollReport) -> str:
    """What a completed poll did, as the summary line and the daemon's log show it."""
    c = report.counts
    return (
        f"{c.listed} on server, {c.new} new, {c.fetched} fetched ({format_size(c.bytes)}), "
        f"{c.deleted} deleted, {c.skipped} skipped, {report.seconds:.1f} s"
    )


def body_limit(size: int | None, max_message_size: int | None) -> int:
    """How many bytes RETR may deliver before the body is cut off (I4)."""
    limits = [HARD_CAP]
    if size is not None:
        limits.append(size + size // 2 + SIZE_SLACK)
    if max_message_size is not None:
        limits.append(max_message_size)
    return min(limits)


def session_options(account: Account) -> SessionOptions:
    """The session settings of *account*, its time limits included: ``timeout``
    per read and status line, ``min_rate`` for listings and bodies, and
    ``poll_timeout`` for the whole session (see :mod:`popsync.pace`)."""
    return SessionOptions(
        host=account.host,
        port=account.port,
        username=account.username,
        tls=account.tls,
        ssl_context=None if account.tls == TlsMode.NONE else make_ssl_context(account.ca_file),
        auth=account.auth,
        allow_plaintext=account.allow_plaintext,
        timeout=account.timeout,
        max_line=account.max_line_length,
        pipeline_window=account.pipeline_window,
        poll_timeout=account.poll_timeout,
        min_rate=account.min_rate,
    )


class _Poll:
    """The state of one poll in progress; :meth:`run` is the whole algorithm."""

    def __init__(
        self,
        account: Account,
        ledger: Ledger,
        maildir: Maildir,
        report: PollReport,
        now: Callable[[], float],
        progress: Progress | None,
        should_stop: Callable[[], bool],
    ) -> None:
        self.account = account
        self.should_stop = should_stop
        self.name = account.name
        self.ledger = ledger
        self.maildir = maildir
        self.report = report
        self.now = now
        self.progress = progress
        self.fetched = 0
        self.bytes = 0
        self.skipped = 0
        self.failed: list[str] = []
        self.dele_ok: set[int] = set()
        self.to_record: dict[int, tuple[bytes, int]] = {}  # msg -> key, for DELEs

    # -- the algorithm ---------------------------------------------------------

    def run(self, session_factory: Callable[[SessionOptions], Session]) -> None:
        """One session, or a few: a message cut off for running past its size
        is skipped and the poll goes on with a fresh session (the cut-off
        leaves the old one mid-body), at most :data:`MAX_SESSIONS` times."""
        secret = self.account.secret()  # a bad secret source fails before connecting
        for attempt in range(MAX_SESSIONS):
            rows = self.recover(self.ledger.rows(self.name))
            skipped = self.skipped
            try:
                self.session(session_factory, rows, secret)
            except BodyLimitExceeded:
                # Go on only if the culprit is now skipped (not, say, a TOP).
                if self.skipped == skipped or attempt == MAX_SESSIONS - 1:
                    raise
                continue
            break
        if self.failed:
            raise _Incomplete(self.failed)

    def session(
        self,
        session_factory: Callable[[SessionOptions], Session],
        rows: dict[tuple[bytes, int], LedgerRow],
        secret: str,
    ) -> None:
        self.dele_ok.clear()
        self.to_record.clear()
        opts = session_options(self.account)
        with session_factory(opts) as session:
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
            uidl = session.uidl()
            now = self.now()
            policy = Policy(self.account.delete_after_days, self.account.max_message_size, now)
            unsized, _ = join_listings(uidl, ())
            wanted = needs_size(unsized, rows, policy)
            # Sizes only where the plan uses them: nothing for a poll with
            # nothing to do, LIST n for a few, the whole LIST for many.
            if not wanted:
                scan: list[tuple[int, int]] = []
            elif len(wanted) <= SCAN_ONE_BY_ONE:
                scan = session.scan(wanted)
            else:
                scan = session.scan()
            # Nothing sized: the entries already joined serve as they are.
            messages, waiting = join_listings(uidl, scan) if scan else (unsized, [])
            the_plan = plan(messages, rows, policy, waiting)
            self.describe(the_plan)
            confirmed, reused = self.confirm_deletes(session, the_plan.delete)
            fetches = self.claim_names((*the_plan.fetch, *reused), rows, now)
            for item in confirmed:
                session.queue_dele(item.message.msg)
                self.to_record[item.message.msg] = (item.message.uid, item.message.occurrence)
            self.fetch(session, fetches)
            for event in session.retrieve(()):  # the DELEs still queued
                self.on_dele(event)
            failpoints.failpoint("after_dele")
            self.count(the_plan, deleted=0)
            session.quit()
            failpoints.failpoint("after_quit")
        deleted = [self.to_record[msg] for msg in sorted(self.dele_ok)]
        self.ledger.mark_deleted(self.name, [*deleted, *the_plan.gone], self.now())
        self.count(the_plan, deleted=len(deleted))
        stale_before = now - SEEN_REFRESH
        stale = [
            (uid, occurrence)
            for _, uid, occurrence, _ in messages
            if (row := rows.get((uid, occurrence))) is not None and row.last_seen < stale_before
        ]
        if stale:
            self.ledger.touch_seen(self.name, stale, now)

    def count(self, the_plan: Plan, *, deleted: int) -> None:
        self.report.counts = PollCounts(
            listed=the_plan.listed,
            new=len(the_plan.fetch),
            fetched=self.fetched,
            deleted=deleted,
            skipped=len(the_plan.skip) + self.skipped,
            bytes=self.bytes,
        )

    def warn(self, text: str) -> None:
        self.report.warnings.append(text)
        log.warning("%s: %s", self.name, text)

    def describe(self, the_plan: Plan) -> None:
        if the_plan.new_ambiguous:
            shown = ", ".join(escape_server_text(uid) for uid in sorted(the_plan.new_ambiguous)[:3])
            self.warn(
                f"server lists {len(the_plan.new_ambiguous)} unique-id(s) for more than one "
                f"message ({shown}), against RFC 1939 §7: each copy is fetched once and none "
                "of them is ever deleted by popsync (see README, 'Duplicate unique-ids')"
            )
        if the_plan.waiting:
            self.warn(f"{len(the_plan.waiting)} message(s) have no unique-id yet; next poll")
        if the_plan.skip:
            skipped = [
                Skipped(
                    s.message.uid, s.message.occurrence, s.message.size or 0, s.reason, self.now()
                )
                for s in the_plan.skip
            ]
            self.ledger.mark_skipped(self.name, skipped)
            for s in the_plan.skip:
                self.warn(f"message {s.message.msg} ({s.message.size} bytes) skipped: {s.reason}")

    # -- recovery (step 2) and names (step 5) ------------------------------------------

    def recover(
        self, rows: dict[tuple[bytes, int], LedgerRow]
    ) -> dict[tuple[bytes, int], LedgerRow]:
        """Turn ``fetching`` rows whose file reached new/ or cur/ into ``delivered``.

        A crash after ``link()`` but before the ledger commit leaves exactly
        this; the file is complete (it was fsynced before the link).
        """
        pending = [r for r in rows.values() if r.state == "fetching" and r.maildir_name]
        if not pending:
            return rows
        index = self.maildir.snapshot()
        found = []
        for row in pending:
            assert row.maildir_name is not None
            path = index.find(row.maildir_name) or index.find_hash(name_hash(row.maildir_name))
            if path is not None:
                found.append(self.delivered_from_file(row.uid, row.occurrence, path))
        if not found:
            return rows
        self.maildir.sync_new()  # the crashed run may not have fsynced new/
        self.ledger.mark_delivered(self.name, found)
        log.info("%s: recovered %d message(s) delivered before a crash", self.name, len(found))
        return self.ledger.rows(self.name)

    @staticmethod
    def delivered_from_file(uid: bytes, occurrence: int, path: Path) -> Delivered:
        """What the ledger records of a file found after a crash or a lost ledger."""
        measured = measure_file(path)
        headers = digest_headers(measured.header_section)
        return Delivered(
            uid,
            occurrence,
            measured.size,
            measured.sha256,
            path.stat().st_mtime,
            headers.full,
            measured.wire_size,
            headers.stable,
            headers.mutable_octets,
            headers.mutable_lines,
        )

    def claim_names(
        self, fetch: Sequence[Fetch], rows: dict[tuple[bytes, int], LedgerRow], now: float
    ) -> list[tuple[Fetch, str]]:
        """Choose and commit every Maildir name before any RETR.

        The name is derived from a hash of account, UID and occurrence, so no
        server byte reaches a path and a crashed fetch is found again.
        """
        if not fetch:
            return []
        index: MaildirIndex | None = None
        intents: list[FetchIntent] = []
        already: list[Delivered] = []
        fetches: list[tuple[Fetch, str]] = []
        for item in fetch:
            m = item.message
            name = item.existing_name
            if name is None:
                # Second line of defence (a lost or rebuilt ledger): a file
                # carrying this message's hash name is already delivered.
                index = index or self.maildir.snapshot()
                path = index.find_hash(delivery_hash(self.name, m.uid, m.occurrence))
                if path is not None:
                    name = path.name.split(self.maildir.info_sep, 1)[0]
                    intents.append(FetchIntent(m.uid, m.occurrence, m.size or 0, name, now))
                    already.append(self.delivered_from_file(m.uid, m.occurrence, path))
                    continue
                name = unique_name(self.name, m.uid, m.occurrence, int(now))
            intents.append(FetchIntent(m.uid, m.occurrence, m.size or 0, name, now))
            fetches.append((item, name))
        self.ledger.begin_fetch(self.name, intents)
        if already:
            self.ledger.mark_delivered(self.name, already)
            self.warn(f"{len(already)} message(s) were already in the Maildir; not fetched again")
        failpoints.failpoint("after_begin_fetch")
        return fetches

    # -- confirming deletions (step 7) ------------------------------------------------

    def confirm_deletes(
        self, session: Session, deletes: Sequence[Delete]
    ) -> tuple[list[Delete], list[Fetch]]:
        """Split the due DELEs into confirmed ones and unique-ids now reused.

        Mail delivered in an earlier session is DELEd only when ``TOP n 0``
        and the LIST size show it is still the message stored, and the stored
        copy is complete (:func:`popsync.identity.judge`).  TOP is sent even
        when CAPA does not list it (most servers have it; RFC 1939 §7); a
        ``-ERR`` means "cannot confirm", never "go ahead".  What cannot be
        confirmed stays on the server, reported once per message and reason.
        A unique-id that now names another message (headers and size both
        differ) is retired in the ledger and its message fetched as new.
        """
        if not deletes:
            return [], []
        tops = self.read_headers(session, deletes)
        confirmed: list[Delete] = []
        reused: list[Fetch] = []
        withheld: list[tuple[tuple[bytes, int], str | None]] = []
        index: MaildirIndex | None = None
        for item in deletes:
            row = item.row
            stored = stored_of(row)
            if stored is None:  # delivered by an older popsync: measure the file
                index = index or self.maildir.snapshot()
                stored = self.stored_from_file(row, index)
            size = item.message.size
            assert size is not None  # plan() only offers sized messages
            verdict = judge(stored, size, tops.get(item.message.msg))
            if verdict.verdict is Verdict.SAME:
                confirmed.append(item)
                if row.withheld is not None:
                    withheld.append((row.key, None))
            elif verdict.verdict is Verdict.OTHER:
                self.warn(
                    f"unique-id {escape_server_text(row.uid)} now names another message "
                    f"({verdict.reason}); the server reused it: fetching it as a new message"
                )
                # A name of its own: the hash name of (uid, occurrence) is the
                # retired copy's, and would be taken for this one's delivery.
                fresh = unique_name(
                    self.name,
                    row.uid + b" after %d" % row.id,
                    row.occurrence,
                    int(self.now()),
                )
                reused.append(Fetch(item.message, existing_name=fresh, delete_after=False))
            elif row.withheld != verdict.reason:
                self.warn(
                    f"message {item.message.msg} (unique-id {escape_server_text(row.uid)}) "
                    f"is due for deletion but not deleted: {verdict.reason}"
                )
                withheld.append((row.key, verdict.reason))
        self.ledger.mark_withheld(self.name, withheld)
        self.ledger.retire(self.name, [(f.message.uid, f.message.occurrence) for f in reused])
        return confirmed, reused

    def read_headers(
        self, session: Session, deletes: Sequence[Delete]
    ) -> dict[int, HeaderDigest | None]:
        """``TOP n 0`` for each message (pipelined); None where refused."""
        tops: dict[int, HeaderDigest | None] = {}
        hasher = HeaderHasher()
        requests = (
            RetrRequest(d.message.msg, body_limit(d.message.size, None), top=0) for d in deletes
        )
        for event in session.retrieve(requests):
            command = event.command
            if not isinstance(command, Top):
                continue
            if isinstance(event, Ok):
                hasher = HeaderHasher()
            elif isinstance(event, BodyData):
                hasher.feed(event.data)
            elif isinstance(event, EndOfBody):
                tops[command.msg] = hasher.digest()
            elif isinstance(event, Err):
                tops[command.msg] = None
        return tops

    @staticmethod
    def stored_from_file(row: LedgerRow, index: MaildirIndex) -> Stored:
        """What a copy delivered by an older popsync (which recorded less) is,
        measured from its file -- if it is still there with the stored hash;
        else a record that :func:`popsync.identity.judge` will not confirm."""
        path = index.find(row.maildir_name) if row.maildir_name else None
        measured = None
        if path is not None:
            with contextlib.suppress(DeliveryError):
                measured = measure_file(path)
        if measured is None or measured.sha256 != row.sha256:
            return Stored(row.server_size, None, row.stored_size or 0, "", 0, 0)
        headers = digest_headers(measured.header_section)
        return Stored(
            row.server_size,
            measured.wire_size,
            measured.size,
            headers.stable,
            headers.mutable_octets,
            headers.mutable_lines,
        )

    # -- fetching (step 6) ------------------------------------------------------------

    def fetch(self, session: Session, fetches: list[tuple[Fetch, str]]) -> None:
        """RETR every planned message, pipelined, into the Maildir; see :class:`_Stream`."""
        with DeliveryPipeline(self.maildir) as pipeline:
            stream = _Stream(self, session, pipeline, fetches)
            try:
                stream.run()
            except BaseException as exc:
                # Messages confirmed complete become durable and recorded, so
                # the next poll needs no recovery -- but no DELE is queued on a
                # broken session.  If that fails too, the first error is the
                # one to report; the next poll's recovery finds what was linked.
                doubtful = stream.abandon()
                with contextlib.suppress(PopsyncError):
                    self.flush(stream.batch, pipeline, None)
                with contextlib.suppress(PopsyncError):
                    self.blame(doubtful, exc)
                raise
            self.flush(stream.batch, pipeline, session)
        self.report_progress(len(fetches))

    def blame(self, doubtful: list[Fetch], exc: BaseException) -> None:
        """Charge a failed session to the messages in flight when it failed.

        A message cut off for running past its limit is skipped from now on
        (while the server lists it with the same size); any other failure
        counts one attempt, and messages that failed are fetched after the
        others next time, so none can starve the account.
        """
        if not doubtful:
            return
        if isinstance(exc, BodyLimitExceeded):
            for item in doubtful:
                if item.message.msg == exc.msg:
                    self.skip_cut_off(item, exc)
                    return
        keys = [(item.message.uid, item.message.occurrence) for item in doubtful]
        self.ledger.record_attempts(self.name, keys, self.now())

    def skip_cut_off(self, item: Fetch, exc: BodyLimitExceeded) -> None:
        m = item.message
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

    def stopped(self) -> bool:
        if self.should_stop():
            if not self.report.interrupted:
                self.report.interrupted = True
                self.warn("stop requested: finishing the messages in flight, then QUIT")
            return True
        return False

    def flush(self, batch: _Batch, pipeline: DeliveryPipeline, session: Session | None) -> None:
        """Make the batch durable, record it in one commit, then allow its DELEs.

        The order is the promise (I1): every file fsynced, then linked into
        new/, then new/ fsynced, then the ledger commit, then DELE.
        """
        entries = batch.take()
        if not entries:
            return
        finished = pipeline.complete()  # raises if any fsync failed: nothing linked
        assert [t for t, _, _ in entries] == finished
        failpoints.failpoint("after_tmp_fsync")
        for tmp, _, _ in entries:
            self.maildir.deliver(tmp)
        failpoints.failpoint("after_link")
        self.maildir.sync_new()
        failpoints.failpoint("after_dir_fsync")
        items = [delivered for _, delivered, _ in entries]
        self.ledger.mark_delivered(self.name, items)
        failpoints.failpoint("after_commit")
        self.fetched += len(items)
        self.bytes += sum(d.stored_size for d in items)
        if session is not None:
            for _, delivered, msg in entries:
                if msg is not None:
                    self.to_record[msg] = (delivered.uid, delivered.occurrence)
                    session.queue_dele(msg)

    def on_dele(self, event: Reply) -> None:
        command = event.command
        if not isinstance(command, Dele):
            return  # the NOOP that closes a stream
        assert isinstance(event, Ok | Err)
        if isinstance(event, Ok):
            self.dele_ok.add(command.msg)
        else:
            self.warn(f"DELE {command.msg} refused: {escape_server_text(event.text)}")

    def report_progress(self, planned: int) -> None:
        if self.progress is not None:
            self.progress(self.fetched, planned, self.bytes)


class _Stream:
    """The RETR stream of one session: bodies into tmp files, trusted only
    when the server's next reply is well-formed.

    A body ends at a lone ``.`` line, but a broken server or proxy may send
    such a line inside a message; the early end shows only in what follows
    (not a status line).  So a finished body waits in :attr:`unconfirmed`
    until the next ``+OK``/``-ERR`` arrives -- another RETR's, a DELE's, or the
    NOOP that :meth:`Session.retrieve` sends after the last one -- and only
    then joins the batch that is fsynced, linked and recorded.  A body that
    arrives far shorter than its LIST size is not trusted either.
    """

    def __init__(
        self,
        poll: _Poll,
        session: Session,
        pipeline: DeliveryPipeline,
        fetches: list[tuple[Fetch, str]],
    ) -> None:
        self.poll = poll
        self.session = session
        self.pipeline = pipeline
        self.fetches = fetches
        self.by_msg = {item.message.msg: (item, name) for item, name in fetches}
        self.batch = _Batch()
        #: The body being received: its plan item, file and header digest.
        self.current: tuple[Fetch, TmpMessage, HeaderHasher] | None = None
        #: A finished body waiting for the next well-formed reply.
        self.unconfirmed: tuple[Fetch, TmpMessage, Delivered] | None = None

    def requests(self) -> Iterator[RetrRequest]:
        limit = self.poll.account.max_message_size
        for item, name in self.fetches:
            # A stop request ends the stream of new RETRs; those in flight
            # finish, their batch is committed and its DELEs sent, then QUIT.
            if self.poll.stopped():
                return
            self.pipeline.reserve(name)  # tmp/<name> is created meanwhile
            yield RetrRequest(item.message.msg, body_limit(item.message.size, limit))

    def run(self) -> None:
        poll = self.poll
        for event in self.session.retrieve(self.requests()):
            if self.unconfirmed is not None and isinstance(event, Ok | Err):
                self.confirm()
            command = event.command
            if not isinstance(command, Retr):
                poll.on_dele(event)  # a DELE's reply, or the closing NOOP's
                continue
            if isinstance(event, Ok):
                item, name = self.by_msg[command.msg]
                self.current = (item, self.pipeline.open(name), HeaderHasher())
            elif isinstance(event, BodyData):
                assert self.current is not None
                _, tmp, headers = self.current
                tmp.write(event.data)
                headers.feed(event.data)
                failpoints.failpoint("mid_body")
            elif isinstance(event, EndOfBody):
                self.end_body(event.octets)
            elif isinstance(event, Err):
                text = escape_server_text(event.text)
                poll.failed.append(f"RETR {command.msg}: -ERR {text}")

    def end_body(self, octets: int) -> None:
        assert self.current is not None
        item, tmp, headers = self.current
        self.current = None
        m = item.message
        if is_short(octets, m.size):
            tmp.abort()
            self.poll.failed.append(
                f"RETR {m.msg}: the body has {octets} octets but LIST said {m.size}; not trusted"
            )
            self.poll.ledger.record_attempts(
                self.poll.name, [(m.uid, m.occurrence)], self.poll.now()
            )
            return
        digest = headers.digest()
        delivered = Delivered(
            m.uid,
            m.occurrence,
            tmp.size,
            tmp.sha256_hex,
            self.poll.now(),
            digest.full if digest else None,
            octets,
            digest.stable if digest else None,
            digest.mutable_octets if digest else None,
            digest.mutable_lines if digest else None,
        )
        self.unconfirmed = (item, tmp, delivered)

    def confirm(self) -> None:
        assert self.unconfirmed is not None
        item, tmp, delivered = self.unconfirmed
        self.unconfirmed = None
        self.pipeline.finish(tmp)  # flush + fsync + close, in the background
        self.batch.add(tmp, delivered, item.message.msg if item.delete_after else None)
        if self.batch.due():
            self.poll.flush(self.batch, self.pipeline, self.session)
            self.poll.report_progress(len(self.fetches))

    def abandon(self) -> list[Fetch]:
        """The session broke: drop the bodies not yet trusted; return their items."""
        doubtful = []
        for pending in (self.current, self.unconfirmed):
            if pending is not None:
                doubtful.append(pending[0])
                pending[1].abort()
        self.current = self.unconfirmed = None
        return doubtful


@dataclass(frozen=True, slots=True)
class _Measured:
    size: int
    sha256: str
    wire_size: int  # as the server counts it: each stored LF was a CRLF
    header_section: bytes


def measure_file(path: Path) -> _Measured:
    """Size, SHA-256, wire size and header section of a delivered file.

    Opens with O_NOFOLLOW and reads only a regular file (a FIFO planted under
    a message name must not hang a poll).  Raises DeliveryError.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise DeliveryError(f"{path}: cannot open: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise DeliveryError(f"{path}: not a regular file")
        digest = hashlib.sha256()
        size = lines = 0
        head = bytearray()
        try:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
                lines += chunk.count(b"\n")
                if len(head) <= HEADER_CAP:
                    head += chunk[: HEADER_CAP + 1 - len(head)]
        except OSError as exc:
            raise DeliveryError(f"{path}: cannot read: {exc.strerror}") from None
    end = head.find(b"\n\n")
    section = bytes(head[: end + 2]) if end >= 0 else bytes(head)
    return _Measured(size, digest.hexdigest(), size + lines, section)


def stored_of(row: LedgerRow) -> Stored | None:
    """What :func:`popsync.identity.judge` needs of a ledger row; None for a
    row delivered by an older popsync, which did not record it all."""
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


class _Batch:
    """Complete messages waiting for their fsync, link, directory fsync and commit."""

    def __init__(self) -> None:
        self.entries: list[tuple[TmpMessage, Delivered, int | None]] = []
        self.bytes = 0
        self.started = time.monotonic()

    def add(self, tmp: TmpMessage, delivered: Delivered, dele_msg: int | None) -> None:
        if not self.entries:
            self.started = time.monotonic()
        self.entries.append((tmp, delivered, dele_msg))
        self.bytes += delivered.stored_size

    def due(self) -> bool:
        return (
            len(self.entries) >= BATCH_MESSAGES
            or self.bytes >= BATCH_BYTES
            or time.monotonic() - self.started >= BATCH_SECONDS
        )

    def take(self) -> list[tuple[TmpMessage, Delivered, int | None]]:
        """Empty the batch and return what it held (so a failure never replays it)."""
        entries, self.entries, self.bytes = self.entries, [], 0
        return entries


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
) -> PollReport:
    """Poll *account* once; never raises for faults of the network, server or disk.

    *should_stop* is asked between messages; once it says True no further
    RETR is sent, and the poll finishes what is in flight and QUITs cleanly.
    """
    report = PollReport(account.name)
    started = time.monotonic()
    poll_id: int | None = None
    try:
        with ExitStack() as stack:
            stack.enter_context(account_lock(state_dir, account.name, wait=lock_wait))
            poll_id = ledger.start_poll(account.name, now())
            maildir = stack.enter_context(Maildir(account.maildir))
            maildir.sweep_tmp()
            poll = _Poll(account, ledger, maildir, report, now, progress, should_stop)
            if maildir.is_on_nfs():
                poll.warn("the Maildir is on a network file system; see README")
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
