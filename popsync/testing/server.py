"""A scriptable POP3 server for popsync's tests and for ``popsync demo``.

Usage::

    store = MailStore(sample_messages())
    with POP3TestServer(store, faults=Faults(drop_during_retr=(2, 100))) as srv:
        ...connect to srv.host, srv.port...
        record = srv.wait_for_sessions(1)[0]
        assert not record.sent_in_clear(b"PASS")

Contract and invariants:

* Listens on 127.0.0.1, port 0 (an ephemeral port) by default; one daemon
  thread accepts, one daemon thread serves each connection
  (:mod:`popsync.testing.server_session`).  Nothing here imports pytest or trustme.
* Speaks RFC 1939 (USER/PASS, APOP, STAT, LIST, UIDL, RETR, TOP, DELE, NOOP,
  RSET, QUIT), RFC 2449 (CAPA, response codes, PIPELINING), RFC 2595 (STLS),
  RFC 5034 (AUTH PLAIN) and implicit TLS.  For implicit TLS each accepted
  connection is wrapped with the given server context in its own thread, so a
  client that never finishes its handshake blocks only itself.
* Deletions reach the :class:`MailStore` only at QUIT from TRANSACTION; every
  other ending leaves the store untouched (RFC 1939 §6).
* :meth:`POP3TestServer.stop` returns promptly: it closes the listener, sets
  the stop event every wait in a session watches, shuts down every session
  socket (which wakes blocked reads and writes, TLS included) and joins the
  threads with a deadline.  No global socket timeout, no signals.
* :attr:`POP3TestServer.faults` and :attr:`POP3TestServer.on_command` may be
  replaced while the server runs; each session keeps the values it saw when
  its connection was accepted.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Literal, Self

from popsync.testing.faults import OVERLONG_PLACES, Faults, OverlongPlace
from popsync.testing.mailstore import MailStore, StoredMessage, to_crlf, to_wire
from popsync.testing.server_config import ServerConfig
from popsync.testing.server_session import Session
from popsync.testing.server_state import CommandHook, Phase, SessionRecord, SessionState

__all__ = [
    "OVERLONG_PLACES",
    "CommandHook",
    "Faults",
    "MailStore",
    "OverlongPlace",
    "POP3TestServer",
    "Phase",
    "ServerConfig",
    "SessionRecord",
    "SessionState",
    "StoredMessage",
    "to_crlf",
    "to_wire",
]

#: How often the accept loop looks at the stop flag if shutdown() did not wake it.
_ACCEPT_POLL = 0.25


class POP3TestServer:
    """A threaded POP3 server on the loopback interface, driven by options and faults."""

    def __init__(
        self,
        store: MailStore | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        username: str = "user",
        password: str = "pass",  # noqa: S107 - the test account
        tls: Literal["none", "implicit"] = "none",
        ssl_context: ssl.SSLContext | None = None,
        stls: bool | None = None,
        apop: bool = True,
        pipelining: bool = True,
        sasl: tuple[str, ...] = ("PLAIN",),
        user: bool = True,
        top: bool = True,
        uidl: bool = True,
        resp_codes: bool = True,
        auth_resp_code: bool = True,
        login_delay: int | None = None,
        expire: str | None = None,
        exclusive_lock: bool = True,
        require_tls_for_auth: bool = False,
        faults: Faults | None = None,
        on_command: CommandHook | None = None,
        max_line_length: int = 1 << 16,
        idle_timeout: float = 600.0,
        mbox_status: bool = False,
        utf8_wrapper: bool = False,
        write_each: bool = False,
        mailboxes: Mapping[str, MailStore] | None = None,
    ) -> None:
        """Configure the server (it listens only after :meth:`start`).

        ``stls`` defaults to True when an ``ssl_context`` is given and ``tls``
        is ``"none"``.  ``on_command(state, line)`` is called with every line
        received (SASL continuation lines included) after any stall and
        before normal handling; bytes it returns are sent verbatim instead of
        the server's answer, None lets the server answer.  Capability switches
        also switch the command off (``user=False`` refuses USER/PASS,
        ``top=False`` refuses TOP, ``uidl=False`` refuses UIDL).  ``mbox_status``
        ``utf8_wrapper`` and ``write_each`` imitate real servers' habits (see
        :class:`~popsync.testing.server_config.ServerConfig`).  ``mailboxes``
        serves many users: each key is a username (all share ``password``)
        and its value that user's maildrop; ``store`` and ``username`` are
        then unused.

        Raises ValueError when the options contradict each other (implicit
        TLS or STLS without a context, an unknown ``tls``).
        """
        if stls is None:
            stls = ssl_context is not None and tls == "none"
        self.config = ServerConfig(
            username=username,
            password=password,
            tls=tls,
            ssl_context=ssl_context,
            stls=stls,
            apop=apop,
            pipelining=pipelining,
            sasl=sasl,
            user=user,
            top=top,
            uidl=uidl,
            resp_codes=resp_codes,
            auth_resp_code=auth_resp_code,
            login_delay=login_delay,
            expire=expire,
            exclusive_lock=exclusive_lock,
            require_tls_for_auth=require_tls_for_auth,
            max_line_length=max_line_length,
            idle_timeout=idle_timeout,
            mbox_status=mbox_status,
            utf8_wrapper=utf8_wrapper,
            write_each=write_each,
        )
        self.store = store if store is not None else MailStore()
        self.mailboxes = dict(mailboxes) if mailboxes is not None else None
        self.faults = faults if faults is not None else Faults()
        self.on_command = on_command
        self._bind_host = host
        self._bind_port = port
        self._listener: socket.socket | None = None
        self._address: tuple[str, int] | None = None
        self._stopping = threading.Event()
        self._cond = threading.Condition()
        self._records: list[SessionRecord] = []
        self._live: dict[int, Session] = {}
        self._threads: list[threading.Thread] = []
        self._acceptor: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------

    def start(self) -> Self:
        """Bind, listen and start accepting; returns self.

        Raises RuntimeError if already started, OSError if binding fails.
        """
        if self._listener is not None or self._stopping.is_set():
            raise RuntimeError("a POP3TestServer can be started once")
        family = socket.AF_INET6 if ":" in self._bind_host else socket.AF_INET
        listener = socket.create_server((self._bind_host, self._bind_port), family=family)
        listener.settimeout(_ACCEPT_POLL)
        self._listener = listener
        sockname = listener.getsockname()
        self._address = (sockname[0], sockname[1])
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="pop3-test-accept", daemon=True
        )
        self._acceptor.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every session, then join the threads.

        Idempotent.  Sessions end without UPDATE unless their QUIT was already
        processed.  Threads still alive after *timeout* seconds (none should
        be) are left behind as daemons rather than hanging the caller.
        """
        self._stopping.set()
        listener = self._listener
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        with self._cond:
            live = list(self._live.values())
        for session in live:
            session.interrupt()
        deadline = time.monotonic() + timeout
        threads = [self._acceptor] if self._acceptor is not None else []
        with self._cond:
            threads += self._threads
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        if listener is not None:
            listener.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- address ----------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the server listens on; RuntimeError before :meth:`start`."""
        if self._address is None:
            raise RuntimeError("the server is not started")
        return self._address

    @property
    def host(self) -> str:
        """The listening address (RuntimeError before :meth:`start`)."""
        return self.address[0]

    @property
    def port(self) -> int:
        """The listening port, the real one when 0 was asked (RuntimeError before start)."""
        return self.address[1]

    # -- records ----------------------------------------------------------

    @property
    def sessions(self) -> list[SessionRecord]:
        """A snapshot of the records of all connections so far, in accept order."""
        with self._cond:
            return list(self._records)

    def overlaps(self) -> list[SessionRecord]:
        """Sessions that logged in while another session of the same maildrop was
        logged in (see :attr:`SessionRecord.overlapped`)."""
        with self._cond:
            return [r for r in self._records if r.overlapped]

    def wait_for_sessions(self, n: int, timeout: float = 5.0) -> list[SessionRecord]:
        """Wait until at least *n* sessions have finished; return the first *n* finished.

        "Finished" means the session is over and its record (deletions
        included) is final; the socket may still be closing.  Raises TimeoutError after
        *timeout* seconds.
        """
        with self._cond:
            done = self._cond.wait_for(
                lambda: sum(r.finished for r in self._records) >= n, timeout=timeout
            )
            finished = [r for r in self._records if r.finished]
        if not done:
            raise TimeoutError(f"{len(finished)} of {n} POP3 sessions finished in {timeout}s")
        return finished[:n]

    # -- threads ----------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                # Stopped (shutdown wakes accept with an error), or a passing
                # failure such as EMFILE: look at the flag again shortly.
                self._stopping.wait(0.05)
                continue
            if self._stopping.is_set():
                conn.close()
                break
            self._spawn(conn, (str(peer[0]), int(peer[1])))

    def _spawn(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        with self._cond:
            record = SessionRecord(number=len(self._records) + 1, peer=peer)
            self._records.append(record)
            session = Session(
                conn,
                record,
                config=self.config,
                faults=self.faults,
                hook=self.on_command,
                store=self.store,
                stopping=self._stopping,
                on_finished=self._mark_finished,
                mailboxes=self.mailboxes,
            )
            self._live[record.number] = session
            thread = threading.Thread(
                target=self._run_session,
                args=(session,),
                name=f"pop3-test-session-{record.number}",
                daemon=True,
            )
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _mark_finished(self, record: SessionRecord) -> None:
        with self._cond:
            record.finished = True
            self._cond.notify_all()

    def _run_session(self, session: Session) -> None:
        try:
            session.run()
        finally:
            self._mark_finished(session.record)  # idempotent; covers a failing run()
            with self._cond:
                self._live.pop(session.record.number, None)
