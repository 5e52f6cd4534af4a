"""A blocking POP3 client: pumps the sans-I/O core over a transport.

One session, in the order of a poll::

    session = Session.open(opts)        # connect, greeting, CAPA, [STLS, CAPA]
    session.login(secret)               # [UTF8,] auth; no credential in clear unless allowed
    uids = session.uidl()               # UIDL; sizes with scan(): LIST, or LIST n
    session.retrieve(reqs, sink)        # RETR/TOP into a sink, with the DELEs it allows,
                                        # in a bounded window
    session.quit()                      # deletions happen only now (RFC 1939 §6)

Security rules enforced here, before any credential is written:

* ``tls: starttls`` -- STLS must succeed; plaintext bytes after its ``+OK``
  abort the session (core :meth:`Connection.start_tls`); CAPA is sent again
  over TLS and only that answer counts (RFC 2595 §4).
* Without TLS, no USER/PASS/APOP/AUTH is sent unless the account says
  ``allow_plaintext`` (RFC 8314 §5; I3 in docs/design.md §2).
* APOP is used only when configured: MD5 is broken.

Time is bounded three ways, all owned by the pump (:meth:`Session._next`),
never by the protocol core: each read waits at most ``timeout``; each reply
must keep the pace of :mod:`popsync.pace` (a status line within ``timeout``, a
listing or body at ``min_rate`` bytes/s after that grace); and the whole
session must be over ``poll_timeout`` seconds after it connects.  Each limit
raises TimeoutError_ naming what was slow, and the session is then abandoned
without QUIT.

What it does is logged on the ``popsync.steps`` logger, each line naming
the account: each step at INFO (``-v``: connect, TLS, CAPA, STLS, the
mechanism, UTF8, listing counts, QUIT) and the dialog at DEBUG (``-vv``:
``C:``/``S:`` lines as the core traces them, secrets redacted there).

Errors: TransportError / TimeoutError_ (network), SecurityError (refusals),
RemoteProtocolError (server misbehaved), ServerError (``-ERR``, with its
response code).  :meth:`abort` closes without QUIT, so the server never
enters UPDATE and deletes nothing (RFC 1939 §6); it is safe from another
thread, which is how a watchdog frees a session stuck in a read.
"""

from __future__ import annotations

import logging
import math
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from popsync.errors import (
    ConfigError,
    LocalProtocolError,
    RemoteProtocolError,
    SecurityError,
    ServerError,
    TimeoutError_,
    TlsModeMismatch,
    TransportError,
    escape_server_text,
)
from popsync.options import AuthMethod, TlsMode
from popsync.pace import ReplyClock
from popsync.pop3 import (
    NEED_DATA,
    Apop,
    Auth,
    AuthResponse,
    BodyData,
    Capa,
    CapaListing,
    Challenge,
    Command,
    Connection,
    Dele,
    EndOfBody,
    Err,
    Event,
    Greeting,
    List,
    Listing,
    Noop,
    Ok,
    Pass,
    Quit,
    Retr,
    ScanListing,
    Stat,
    State,
    Stls,
    Top,
    Uidl,
    UidListing,
    User,
    Utf8,
)
from popsync.pop3.auth import (
    apop_digest,
    apop_timestamp,
    decode_challenge,
    oauthbearer,
    sasl_plain,
    xoauth2,
)
from popsync.pop3.listing import (
    Capabilities,
    parse_capabilities,
    parse_scan_line,
)
from popsync.pop3.sasl import CramMd5, Mechanism, Scram, Scripted, additional_data
from popsync.transport import Deadline, Transport, answers_tls

#: Most challenges one AUTH exchange may send before we give up on it.
MAX_AUTH_ROUNDS = 8

#: The pipelining window on a fast link, and the least the measured one gets.
BASE_WINDOW = 32
#: The most commands ever in flight (the ``pipeline_window`` key's maximum).
MAX_WINDOW = 256
#: Small messages per second a quick client stores: what the window must keep
#: coming to hide the round trip (a few KiB each, into a Maildir).
SMALL_MESSAGES_PER_SECOND = 3200.0

log = logging.getLogger("popsync.session")
steps = logging.getLogger("popsync.steps")  # -v steps, -vv dialog (popsync.logs)

#: The SCRAM methods ``auth: auto`` tries first, strongest first.
_SCRAM = (AuthMethod.SCRAM_SHA_256, AuthMethod.SCRAM_SHA_1)
#: (host, port, user) -> SCRAM methods the server refused where a fallback
#: worked: this process does not try them again (each try is a failed login
#: in the server's log, and enough of those get an address banned).
_SCRAM_REFUSED: dict[tuple[str, int, str], set[AuthMethod]] = {}
_SCRAM_REFUSED_LOCK = threading.Lock()


def _scram_refusal(method: AuthMethod, exc: ServerError) -> bool:
    """Whether *exc*, the answer to an ``auth: auto`` SCRAM attempt, may mean
    "not with SCRAM": a plain or ``[AUTH]`` refusal.  ``[IN-USE]``,
    ``[LOGIN-DELAY]`` or ``[SYS/...]`` are about the mailbox, not the mechanism."""
    return method in _SCRAM and (exc.code is None or exc.code.top == "AUTH")


def auto_window(round_trip: float | None) -> int:
    """The pipelining window for a link whose round trip is *round_trip* seconds.

    :meth:`Session.retrieve` refills the window once half of it is answered,
    so that half must last one round trip for replies never to stop: the
    window holds two round trips of small messages at the pace a quick client
    stores them.  Never below :data:`BASE_WINDOW` (what a fast link gets; an
    unknown round trip too) nor above :data:`MAX_WINDOW`.
    """
    if round_trip is None:
        return BASE_WINDOW
    wanted = math.ceil(2 * SMALL_MESSAGES_PER_SECOND * round_trip)
    return max(BASE_WINDOW, min(MAX_WINDOW, wanted))


@dataclass(frozen=True, slots=True)
class SessionOptions:
    host: str
    port: int
    username: str
    tls: TlsMode = TlsMode.IMPLICIT
    ssl_context: ssl.SSLContext | None = None
    auth: AuthMethod = AuthMethod.AUTO
    allow_plaintext: bool = False
    #: Seconds one read, and one status line, may take.
    timeout: float = 60.0
    max_line: int = 64 * 1024
    #: Commands in flight with PIPELINING; None: chosen from the round trip
    #: (see :func:`auto_window`).
    pipeline_window: int | None = None
    #: Seconds the whole session may last from the connect on (None: no limit).
    poll_timeout: float | None = None
    #: Bytes/s a listing or body must average once ``timeout`` has passed.
    min_rate: float = 1024.0
    #: The account's name, for the log lines (default: HOST:PORT).
    account: str = ""


@dataclass(frozen=True, slots=True)
class RetrRequest:
    """Fetch message *msg*; a body longer than *limit* bytes is cut off (an error).

    With *top* set, send ``TOP msg top`` instead: the headers and that many
    body lines (RFC 1939 §7).
    """

    msg: int
    limit: int | None = None
    top: int | None = None


class RetrieveSink(Protocol):
    """Where :meth:`Session.retrieve` puts what the server sends.

    For each request, in order: :meth:`started` (``+OK``), :meth:`data` for
    each piece of the body (dot-unstuffed, LF line ends), then
    :meth:`ended` -- only once the server's next reply shows the body was
    whole -- or :meth:`refused` (``-ERR``) instead of all three.
    """

    def started(self, request: RetrRequest) -> None: ...

    def data(self, chunk: bytes) -> None: ...

    def ended(self, request: RetrRequest, octets: int) -> None:
        """The body is complete: *octets* counted as on the wire (RFC 1939 §11)."""

    def refused(self, request: RetrRequest, err: Err) -> None: ...

    def take_deletes(self) -> Iterable[int]:
        """Message numbers to DELE now (each handed out once)."""
        ...

    def deleted(self, msg: int, err: Err | None) -> None:
        """The reply to DELE *msg*: None for ``+OK``."""


class Session:
    """One authenticated (or about to be) POP3 session over one transport."""

    def __init__(self, transport: Transport, options: SessionOptions) -> None:
        self.transport = transport
        self.options = options
        self.label = options.account or transport.where
        tracer = self._trace if steps.isEnabledFor(logging.DEBUG) else None
        self.conn = Connection(max_line=options.max_line, tracer=tracer)
        self.capabilities = Capabilities()
        #: The CAPA lines the current capabilities were parsed from.
        self.capa_lines: tuple[bytes, ...] = ()
        self.greeting = b""
        self._clock = ReplyClock(options.timeout, options.min_rate)
        self._in_stream = False  # a multi-line reply's +OK is in; its lines are due
        #: The shortest time a lone command waited for its status line, in
        #: seconds: the link's round trip plus the server's least think time.
        self.round_trip: float | None = None
        self._window: int | None = None  # chosen at the first pipelined command
        self._owner = threading.get_ident()  # the thread that may close the socket

    # -- opening -------------------------------------------------------------

    @classmethod
    def open(
        cls,
        options: SessionOptions,
        *,
        on_open: Callable[[Session], None] | None = None,
    ) -> Session:
        """Connect and negotiate TLS as configured; ready for :meth:`login`.

        *on_open* is called with the session as soon as it exists, before the
        greeting is read, so that another thread may :meth:`abort` it from
        then on (an error it raises aborts the session and propagates).
        The ``poll_timeout`` deadline starts now.
        """
        ctx = options.ssl_context
        if options.tls != TlsMode.NONE and ctx is None:
            raise LocalProtocolError("a TLS mode needs an ssl_context")
        deadline = None
        if options.poll_timeout is not None:
            deadline = Deadline.after(
                options.poll_timeout,
                f"poll took longer than poll_timeout ({options.poll_timeout:.10g} s); abandoned",
            )
        transport = Transport.connect(
            options.host,
            options.port,
            timeout=options.timeout,
            ssl_context=ctx if options.tls == TlsMode.IMPLICIT else None,
            deadline=deadline,
        )
        return cls.start(transport, options, on_open=on_open)

    @classmethod
    def start(
        cls,
        transport: Transport,
        options: SessionOptions,
        *,
        on_open: Callable[[Session], None] | None = None,
    ) -> Session:
        """The rest of :meth:`open`, over a *transport* already connected:
        greeting, CAPA and, with ``tls: starttls``, STLS and CAPA again.

        On any error the session is aborted (no QUIT) and the error propagates.
        """
        ctx = options.ssl_context
        if options.tls == TlsMode.STARTTLS and ctx is None:
            raise LocalProtocolError("tls: starttls needs an ssl_context")
        session = cls(transport, options)
        try:
            session._log_connect()
            if on_open is not None:
                on_open(session)
            session._expect_clear_greeting()
            session._greet()
            session.capabilities = session._capa()
            if options.tls == TlsMode.STARTTLS:
                assert ctx is not None
                session._starttls(ctx)
        except BaseException:
            session.abort()
            raise
        return session

    def _expect_clear_greeting(self) -> None:
        """On a plain connection, a greeting still silent after
        min(``timeout``, 5 s) makes a probe ask the port whether it expects
        TLS at once (RFC 8314 §3.1); if it does, raise TlsModeMismatch instead
        of waiting out the timeout for a greeting that never comes.

        A slow plain server loses nothing: the probe sends no credential, and
        the greeting is then awaited as usual.
        """
        t = self.transport
        if t.is_tls:
            return
        wait = t.probe_wait()
        if wait <= 0 or t.readable_within(wait) or t.ended() is not None:
            return
        if answers_tls(t.host, t.port, t.probe_wait()):
            raise TlsModeMismatch(
                f"{t.where}: port {t.port} expects TLS at once: use tls: implicit"
            )

    def _greet(self) -> None:
        event = self._next()
        if isinstance(event, Err):
            raise ServerError("greeting", event.text, event.code)
        assert isinstance(event, Greeting)
        self.greeting = event.text

    def _capa(self) -> Capabilities:
        """CAPA (RFC 2449 §5); a server without it gets the RFC 1939 minimum."""
        reply = self._command(Capa())
        if isinstance(reply, Err):
            self.capa_lines = ()
            self._step("capa", "CAPA refused: assuming the RFC 1939 minimum")
            return Capabilities()
        self.capa_lines = reply
        capabilities = parse_capabilities(reply)
        names = " ".join(sorted(capabilities.names))
        if capabilities.sasl:
            names += f" (SASL {' '.join(sorted(capabilities.sasl))})"
        self._step("capa", f"CAPA: {escape_server_text(names)}", capabilities=names)
        return capabilities

    def _starttls(self, ctx: ssl.SSLContext) -> None:
        # Try STLS even if not advertised: an attacker may have stripped it
        # from the plaintext CAPA; a refusal means no TLS, and we stop.
        reply = self._command(Stls())
        if isinstance(reply, Err):
            raise SecurityError("server refused STLS; not continuing without TLS")
        self.conn.start_tls()  # raises SecurityError if plaintext was injected
        self.transport.start_tls(ctx)
        self._log_tls("STLS: TLS")
        self.capabilities = self._capa()  # only the post-TLS list counts

    # -- authentication -----------------------------------------------------------

    @property
    def secure(self) -> bool:
        return self.transport.is_tls

    def login(self, secret: str) -> None:
        """Authenticate with the configured method.

        Raises SecurityError (before sending anything) if that would put the
        secret on an unencrypted connection without ``allow_plaintext``,
        ServerError if the server refuses, and SecurityError if a SCRAM
        server cannot prove it knows the password.

        With ``auth: auto``, SCRAM-SHA-256 and then SCRAM-SHA-1 come first when
        the server offers them.  A server may offer SCRAM yet be unable to do it
        for this user (Dovecot does, when it stores the password in another
        scheme): a refused SCRAM falls back, once, to the next method; when that
        one works, this process stops trying SCRAM for the account and says so
        once in the log.
        """
        opts = self.options
        if not self.secure and not opts.allow_plaintext:
            raise SecurityError(
                "refusing to send credentials without TLS (set allow_plaintext: true to allow)"
            )
        if self.capabilities.has("UTF8"):
            # RFC 6856 §2: messages as stored, not a per-download wrapper.
            # A refusal changes nothing for us; the reply is read either way.
            refused = isinstance(self._command(Utf8()), Err)
            self._step("utf8", f"UTF8 {'refused' if refused else 'accepted'}")
        methods = self._choose_methods()
        for index, method in enumerate(methods):
            last = index + 1 == len(methods)
            self._step(
                "auth",
                f"authenticating as {escape_server_text(opts.username)} with {method.upper()}",
                mechanism=method.upper(),
            )
            try:
                self._login_with(method, secret)
            except ServerError as exc:
                if last or not _scram_refusal(method, exc):
                    raise
                continue
            except ConfigError:
                # SASLprep refused the name or password: SCRAM cannot carry
                # it, the next method can; nothing was sent.
                if last or opts.auth != AuthMethod.AUTO:
                    raise
                continue
            if index:
                self._scram_gave_way(methods[:index], method)
            break
        self.conn.pipelining = False
        if self.capabilities.login_delay is not None or self.capabilities.expire is not None:
            # RFC 2449 §6.5/6.7: the per-user values are shown only after login.
            self.capabilities = self._capa()
        self.conn.pipelining = self.capabilities.pipelining
        # One command at a time: ACK each reply at once (see Transport.quick_ack).
        self.transport.quick_ack = not self.conn.pipelining
        self._step("login", "logged in")

    def _login_with(self, method: AuthMethod, secret: str) -> None:
        opts = self.options
        if method == AuthMethod.USER:
            self._expect_ok(User(opts.username), login=True)
            self._expect_ok(Pass(secret), login=True)
        elif method == AuthMethod.APOP:
            stamp = apop_timestamp(self.greeting)
            if stamp is None:
                raise SecurityError("auth: apop configured, but the greeting has no timestamp")
            self._expect_ok(Apop(opts.username, apop_digest(stamp, secret)), login=True)
        elif method == AuthMethod.LOGIN:
            self._sasl("LOGIN", None, [opts.username.encode(), secret.encode()])
        elif method in _SCRAM:
            self._sasl_exchange(Scram(method.upper(), opts.username, secret))
        elif method == AuthMethod.CRAM_MD5:
            self._sasl_exchange(CramMd5(opts.username, secret))
        else:
            initial = {
                AuthMethod.PLAIN: sasl_plain(opts.username, secret),
                AuthMethod.XOAUTH2: xoauth2(opts.username, secret),
                AuthMethod.OAUTHBEARER: oauthbearer(opts.username, secret),
            }[method]
            # A refused token comes back as a challenge holding an error
            # (RFC 7628 §3.2.2); the client must answer it -- with a lone
            # %x01 (§3.2.3), not "*", which would abort the exchange and hide
            # the server's verdict -- and then gets the final -ERR.
            oauth = method in (AuthMethod.XOAUTH2, AuthMethod.OAUTHBEARER)
            self._sasl(method.upper(), initial, [b"\x01"] if oauth else [])

    def _choose_methods(self) -> list[AuthMethod]:
        """The methods to try, in order: the configured one alone, or for
        ``auto`` the SCRAM mechanisms the server offers (unless it refused
        them before), then SASL PLAIN if offered, else USER/PASS."""
        opts = self.options
        if opts.auth != AuthMethod.AUTO:
            return [opts.auth]
        key = self._scram_key()
        with _SCRAM_REFUSED_LOCK:
            refused = set(_SCRAM_REFUSED.get(key, ()))
        methods = [
            method
            for method in _SCRAM
            if method.upper() in self.capabilities.sasl and method not in refused
        ]
        # SASL PLAIN carries the same secret as PASS but in one round trip.
        methods.append(AuthMethod.PLAIN if "PLAIN" in self.capabilities.sasl else AuthMethod.USER)
        return methods

    def _scram_key(self) -> tuple[str, int, str]:
        return (self.options.host, self.options.port, self.options.username)

    def _scram_gave_way(self, refused: list[AuthMethod], used: AuthMethod) -> None:
        """Remember that *refused* failed where *used* worked, and say so once."""
        with _SCRAM_REFUSED_LOCK:
            _SCRAM_REFUSED.setdefault(self._scram_key(), set()).update(refused)
        names = " and ".join(method.upper() for method in refused)
        log.warning(
            "%s: the server offers %s but refused %s for %s; logged in with %s instead, "
            "and this process will not try %s again (the server probably stores the "
            "password in a scheme that cannot do SCRAM)",
            self.transport.where,
            names,
            "them" if len(refused) > 1 else "it",
            self.options.username,
            used.upper(),
            names,
        )

    def _sasl(self, mechanism: str, initial: bytes | None, answers: list[bytes]) -> None:
        """An RFC 5034 AUTH exchange; *answers* reply to successive challenges."""
        self._sasl_exchange(Scripted(mechanism, initial, answers))

    def _sasl_exchange(self, mechanism: Mechanism) -> None:
        """Drive one RFC 5034 AUTH exchange: *mechanism* answers each ``+``
        challenge (None cancels it with ``*``) and checks the final ``+OK``.

        Every client line of the exchange goes through the core's
        :meth:`Connection.send` / :meth:`Connection.send_auth_response`.
        """
        name = mechanism.name
        initial = mechanism.initial()
        command = Auth(name, initial)
        pending_initial = None
        if initial is not None and not command.fits():
            # RFC 5034 §4: too long for the command line; send it on request.
            command = Auth(name, None)
            pending_initial = initial
        event = self._exchange(command)
        for round_ in range(MAX_AUTH_ROUNDS):
            if round_:
                event = self._next()
            if isinstance(event, Challenge):
                challenge = decode_challenge(event.data)
                if pending_initial is not None:
                    answer: bytes | None = pending_initial
                    pending_initial = None
                else:
                    answer = mechanism.respond(challenge)
                self.transport.send(self.conn.send_auth_response(AuthResponse(answer)))
                continue
            self._check_login_reply(event)
            assert isinstance(event, Ok)
            mechanism.succeeded(additional_data(event.text))
            return
        raise RemoteProtocolError(f"AUTH {name}: too many challenges")

    def _expect_ok(self, command: Command, *, login: bool = False) -> bytes:
        event = self._exchange(command)
        if login:
            self._check_login_reply(event)
            assert isinstance(event, Ok)
            return event.text
        if isinstance(event, Err):
            raise ServerError(command.name, event.text, event.code)
        assert isinstance(event, Ok)
        return event.text

    def _check_login_reply(self, event: Event) -> None:
        if isinstance(event, Err):
            assert event.command is not None
            # RFC 3206 §6: with AUTH-RESP-CODE, a failure without [AUTH] is not
            # about the credentials.  Without it we cannot tell, and retrying a
            # wrong password gets accounts locked: treat it as permanent.
            promised = self.capabilities.has("AUTH-RESP-CODE")
            raise ServerError(event.command.name, event.text, event.code, temporary=promised)
        if not isinstance(event, Ok):
            raise RemoteProtocolError("unexpected reply during login")

    # -- transaction ------------------------------------------------------------

    def uidl(self) -> list[tuple[int, bytes]]:
        """The UIDL listing (RFC 1939 §7); ServerError if refused.

        The core parses and bounds it as it streams (RemoteProtocolError for
        a malformed, overlong or oversized listing): what comes back is the
        final list, built once.
        """
        command = Uidl()
        listing = self._listing_reply(command)
        assert isinstance(listing, UidListing)
        self._step("uidl", f"UIDL: {len(listing.entries)} message(s)", count=len(listing.entries))
        return listing.entries

    def scan(self, msgs: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """Sizes: the whole LIST listing, or ``LIST n`` for just *msgs* (pipelined).

        A ``-ERR`` to one ``LIST n`` leaves that message out; a refused whole
        LIST raises ServerError.
        """
        if msgs is None:
            command = List()
            listing = self._listing_reply(command)
            assert isinstance(listing, ScanListing)
            self._step("list", f"LIST: {len(listing.entries)} size(s)", count=len(listing.entries))
            return listing.entries
        window = self.window()
        sizes: list[tuple[int, int]] = []
        todo = iter(msgs)
        while True:
            out = bytearray()
            while len(self.conn.pending) < window and (msg := next(todo, None)) is not None:
                out += self.conn.send(List(msg))
            if out:
                self.transport.send(bytes(out))
            if not self.conn.pending:
                self._step("list", f"LIST n: {len(sizes)} size(s)", count=len(sizes))
                return sizes
            event = self._next()
            if isinstance(event, Ok):
                sizes.append(parse_scan_line(event.text))
            elif not isinstance(event, Err):
                raise RemoteProtocolError("unexpected reply to LIST")

    def _listing_reply(self, command: Command) -> Listing:
        """Send *command* alone and return its listing; ServerError on ``-ERR``."""
        event = self._exchange(command)
        if isinstance(event, Err):
            # Keep the stream in step for a pipelined follower before raising.
            raise ServerError(command.name, event.text, event.code)
        listing = self._next()
        assert isinstance(listing, Listing)
        return listing

    def retrieve(self, requests: Iterable[RetrRequest], sink: RetrieveSink) -> None:
        """RETR (or TOP) every request into *sink*, with DELEs the sink allows.

        Up to :meth:`window` commands are in flight.  Before each send
        the session asks :meth:`RetrieveSink.take_deletes` for the DELEs the
        sink now allows (it allows one only once its copy is durable and
        recorded), so they ride the same pipeline; their replies go to
        :meth:`RetrieveSink.deleted`.  Returns once every request has been
        answered and no DELE is waiting.  Raises on protocol and transport
        errors; the sink then knows what was in flight (it got ``started``
        and no ``ended``).

        A body is only as trustworthy as what follows it: a stray unstuffed
        ``.`` line inside a message ends the body early, and only the next
        reply shows it (the rest of the message is not a status line).  So
        :meth:`RetrieveSink.ended` is called only once the *next* well-formed
        ``+OK``/``-ERR`` has arrived, and after the last request a ``NOOP``
        provides that reply.
        """
        window = self.window()
        # Refill only once half the window is answered: commands then leave
        # in batches (one send, one segment, one wake-up of the server per
        # half window) instead of one RETR per reply.  Without pipelining
        # (window 1) this is the one-at-a-time exchange it always was.
        low = window // 2
        run = _Retrieval(self.conn, iter(requests), sink)
        while True:
            out = run.fill(window) if len(self.conn.pending) <= low else b""
            if out:
                self.transport.send(out)
            if not self.conn.pending:
                return
            run.dispatch(self._next())

    def window(self) -> int:
        """How many commands to keep in flight: 1 without PIPELINING, else the
        account's ``pipeline_window``, else :func:`auto_window` of the round
        trip measured so far.

        Chosen once, at the first call after login, and logged (``-v``).
        """
        if self._window is None:
            self._window = self._choose_window()
        return self._window

    def _choose_window(self) -> int:
        configured = self.options.pipeline_window
        if not self.conn.pipelining:
            self._step("window", "no PIPELINING: one command at a time", window=1)
            return 1
        rtt = self.round_trip
        shown = "unknown" if rtt is None else f"{rtt * 1000:.1f} ms"
        rtt_ms = None if rtt is None else round(rtt * 1000, 3)
        if configured is not None:
            window, how = configured, "configured"
        else:
            window, how = auto_window(rtt), "from the round trip"
        self._step(
            "window",
            f"pipeline window {window} ({how}; round trip {shown})",
            window=window,
            round_trip_ms=rtt_ms,
        )
        return window

    def quit(self) -> None:
        """QUIT: the server now enters UPDATE and removes what was DELEd (RFC 1939 §6).

        Raises ServerError on ``-ERR`` (e.g. "some deleted messages not
        removed"), TransportError / RemoteProtocolError if the reply was lost
        -- in both cases the outcome is unknown and the next UIDL settles it.
        """
        try:
            self._expect_ok(Quit())
            self._step("quit", "QUIT: +OK")
        finally:
            self.transport.close()

    def abort(self, error: TransportError | None = None) -> None:
        """Drop the connection without QUIT: the server deletes nothing (RFC 1939 §6).

        Safe from any thread.  From the session's own thread it closes the
        socket.  From another it only shuts the socket down (closing it under
        the owner's feet could hit a reused descriptor): a read or write
        blocked in the owner wakes at once.  Either way every later call
        raises *error* (default: TransportError "HOST:PORT: aborted").
        """
        error = error or TransportError(f"{self.transport.where}: aborted")
        if threading.get_ident() == self._owner:
            self.transport.close(error)
        else:
            self.transport.interrupt(error)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.conn.state is not State.DONE:
            self.abort()

    def stat(self) -> tuple[int, int]:
        """STAT (RFC 1939 §5): the number of messages and their total size in octets.

        Raises ServerError on ``-ERR``, RemoteProtocolError on a malformed reply.
        """
        words = self._expect_ok(Stat()).split()
        if len(words) < 2 or not all(w.isdigit() and len(w) <= 20 for w in words[:2]):
            raise RemoteProtocolError("malformed reply to STAT: not 'count size'")
        count, size = int(words[0]), int(words[1])
        self._step("stat", f"STAT: {count} message(s), {size} octets", count=count, bytes=size)
        return count, size

    # -- the log ------------------------------------------------------------------

    def _step(self, event: str, text: str, **fields: object) -> None:
        """One INFO line (``-v``) of what the session did, naming the account."""
        if steps.isEnabledFor(logging.INFO):
            extra = {"account": self.label, "event": event, **fields}
            steps.info("%s: %s", self.label, text, extra=extra)

    def _log_connect(self) -> None:
        if not steps.isEnabledFor(logging.INFO):
            return
        t = self.transport
        peer = t.peer
        self._step(
            "connect",
            f"connected to {t.where} ({peer or 'address unknown'})",
            host=t.host,
            port=t.port,
            address=peer,
        )
        self._log_tls("TLS")

    def _log_tls(self, what: str) -> None:
        if not steps.isEnabledFor(logging.INFO):
            return
        info = self.transport.tls_info()
        if info is not None:
            self._step(
                "tls",
                f"{what} {info.version} {info.cipher}",
                tls_version=info.version,
                cipher=info.cipher,
            )

    def _trace(self, direction: str, line: str) -> None:
        """The core's dialog tracer: one DEBUG line (``-vv``) per line sent or received."""
        extra = {"account": self.label, "event": "dialog", "direction": direction, "line": line}
        steps.debug("%s: %s: %s", self.label, direction, line, extra=extra)

    # -- the pump ---------------------------------------------------------------

    def _command(self, command: Command) -> tuple[bytes, ...] | Err:
        """Send a lone command and return its listing (multi-line) or Err."""
        event = self._exchange(command)
        if isinstance(event, Err):
            return event
        if not command.multiline():
            return ()
        listing = self._next()
        assert isinstance(listing, CapaListing)  # the one listing sent this way
        return listing.lines

    def _exchange(self, command: Command) -> Event:
        """Send *command* and return the first event of its reply.

        When nothing else is in flight, the wait for that status line is a
        sample of the round trip: :attr:`round_trip` keeps the shortest.
        """
        lone = not self.conn.pending
        sent = time.monotonic()
        self.transport.send(self.conn.send(command))
        event = self._next()
        if lone:
            waited = time.monotonic() - sent
            if self.round_trip is None or waited < self.round_trip:
                self.round_trip = waited
        return event

    def _next(self) -> Event:
        """The next event, reading from the transport as needed.

        Raises TimeoutError_ when the server is too slow (see the module
        docstring) and the core's errors when it breaks the protocol.
        """
        conn, clock = self.conn, self._clock
        clock.resume()
        while True:
            event = conn.next_event()
            if event is not NEED_DATA:
                assert not isinstance(event, type(NEED_DATA))
                if isinstance(event, BodyData):
                    clock.pause()  # more of this body is due; the caller's time is its own
                else:
                    clock.done()
                    self._in_stream = isinstance(event, Ok) and event.command.multiline()
                return event
            if not clock.running:
                clock.begin(self._awaited(), stream=self._in_stream)
            conn.receive_data(self._recv())

    def _recv(self) -> bytes:
        clock = self._clock
        try:
            data = self.transport.recv(clock.until())
        except TimeoutError_:
            if self.transport.ended() is not None:  # the deadline, or an abort
                raise
            raise TimeoutError_(f"{self.transport.where}: {clock.too_slow()}") from None
        clock.received(len(data))
        return data

    def _awaited(self) -> str:
        """What the next bytes belong to, for an error: "the greeting", "RETR 3"."""
        if self.conn.state is State.GREETING:
            return "the greeting"
        pending = self.conn.pending
        if not pending:
            return "a reply"
        command = pending[0]
        msg = getattr(command, "msg", None)  # never other arguments: PASS carries a secret
        name = command.name if msg is None else f"{command.name} {msg}"
        if not self._in_stream:
            return f"the reply to {name}"
        return name if isinstance(command, Retr | Top) else f"the {name} listing"


class _Retrieval:
    """The bookkeeping of one :meth:`Session.retrieve`: what to send next,
    and which sink call each event becomes."""

    def __init__(self, conn: Connection, todo: Iterator[RetrRequest], sink: RetrieveSink) -> None:
        self.conn = conn
        self.todo = todo
        self.sink = sink
        self.inflight: deque[RetrRequest] = deque()
        self.finished: tuple[RetrRequest, int] | None = None  # awaiting the next reply
        self.deletes: deque[int] = deque()
        self.exhausted = False
        self.closed = False  # the NOOP after the last request was sent

    def fill(self, window: int) -> bytes:
        """Commands to send now: allowed DELEs first, then requests, then NOOP."""
        self.deletes.extend(self.sink.take_deletes())
        out = bytearray()
        conn = self.conn
        while len(conn.pending) < window:
            if self.deletes:
                out += conn.send(Dele(self.deletes.popleft()))
                continue
            req = None if self.exhausted else next(self.todo, None)
            if req is None:
                self.exhausted = True
                # A body still unconfirmed needs a reply after it: one in
                # flight, or one just ended (always so without pipelining).
                if (self.inflight or self.finished is not None) and not self.closed:
                    out += conn.send(Noop())
                    self.closed = True
                break
            self.inflight.append(req)
            if req.top is None:
                out += conn.send(Retr(req.msg, limit=req.limit))
            else:
                out += conn.send(Top(req.msg, req.top, limit=req.limit))
        return bytes(out)

    def dispatch(self, event: Event) -> None:
        sink = self.sink
        if isinstance(event, BodyData):
            sink.data(event.data)
            return
        if isinstance(event, EndOfBody):
            self.finished = (self.inflight.popleft(), event.octets)
            return
        if not isinstance(event, Ok | Err):
            raise RemoteProtocolError("unexpected reply to RETR or DELE")
        if self.finished is not None:  # a well-formed reply: the last body was whole
            sink.ended(*self.finished)
            self.finished = None
        command = event.command
        if isinstance(command, Dele):
            sink.deleted(command.msg, event if isinstance(event, Err) else None)
        elif isinstance(command, Retr | Top):
            if isinstance(event, Ok):
                sink.started(self.inflight[0])
            else:
                sink.refused(self.inflight.popleft(), event)


__all__ = [
    "BodyData",
    "EndOfBody",
    "RetrRequest",
    "RetrieveSink",
    "Session",
    "SessionOptions",
]
