"""What a test sees of a session: the live state (for hooks) and the record (for asserts).

* :class:`SessionRecord` is written by the session's thread and read by the
  test after :meth:`POP3TestServer.wait_for_sessions` returns it; it is the
  evidence tests use for claims such as "PASS never crossed in clear" or
  "nothing was deleted without QUIT".
* :class:`SessionState` is the session's mutable protocol state (RFC 1939 §3:
  AUTHORIZATION -> TRANSACTION -> UPDATE).  It is handed to the
  ``on_command`` hook, which may read it and, at its own risk, change it (for
  example set :attr:`SessionState.close_requested`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from popsync.testing.mailstore import StoredMessage

__all__ = ["CommandHook", "Phase", "SessionRecord", "SessionState"]


class Phase(enum.Enum):
    """The three POP3 session states of RFC 1939 §3."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


@dataclass(eq=False)
class SessionRecord:
    """What happened on one connection, in order.

    Attributes:
        number: 1-based index of the connection on its server.
        peer: the client's address.
        commands: every line received (without its line end), with whether TLS
            was active when it arrived; SASL continuation lines are included, and
            so are lines a client pipelined in clear after ``STLS`` (which the
            server discards unprocessed).
        deleted: UIDs (as stored) removed from the store at QUIT.
        quit_received: a QUIT command arrived (in any state).
        authenticated: the login succeeded.
        credentials_in_clear: PASS, APOP or AUTH credentials arrived without TLS.
        finished: the session is over and this record is final (the socket may
            still be closing).
        user: the name the session logged in as, or None.
        overlapped: when it logged in, another session of the same maildrop
            was logged in (whether or not the server then refused it).
        error: an unexpected exception that ended the session (a server or hook
            bug), or None.
    """

    number: int
    peer: tuple[str, int]
    commands: list[tuple[bytes, bool]] = field(default_factory=list)
    deleted: list[bytes] = field(default_factory=list)
    quit_received: bool = False
    authenticated: bool = False
    credentials_in_clear: bool = False
    finished: bool = False
    error: BaseException | None = None
    user: str | None = None
    overlapped: bool = False

    def sent_in_clear(self, prefix: bytes) -> bool:
        """Whether any received line starting with *prefix* arrived without TLS.

        The comparison ignores case, as POP3 keywords do (RFC 1939 §3).
        """
        wanted = prefix.upper()
        return any(not tls and line.upper().startswith(wanted) for line, tls in self.commands)

    def command_names(self) -> list[str]:
        """The keyword of each received line, upper-cased (SASL data lines included)."""
        return [
            line.split(b" ", 1)[0].decode("ascii", "replace").upper() for line, _ in self.commands
        ]


@dataclass(eq=False)
class SessionState:
    """The live protocol state of one session (numbers are 1-based, as on the wire).

    Attributes:
        number: same as the record's.
        record: this session's :class:`SessionRecord`.
        phase: the RFC 1939 state.
        tls_active: TLS is up (implicit, or after STLS).
        user: the name given by USER (pending PASS), then the logged-in user.
        banner: the APOP timestamp sent in the greeting (empty if APOP is off).
        messages: the snapshot taken at login; message *n* is ``messages[n-1]``.
        uids: the UIDs this session lists, parallel to :attr:`messages`.
        deleted: message numbers marked by DELE.
        retrieved: message numbers sent by RETR.
        close_requested: set (e.g. by a hook) to close the connection after the
            current reply has been sent; no UPDATE happens.
    """

    number: int
    record: SessionRecord
    phase: Phase = Phase.AUTHORIZATION
    tls_active: bool = False
    user: str | None = None
    banner: bytes = b""
    messages: list[StoredMessage] = field(default_factory=list)
    uids: list[bytes] = field(default_factory=list)
    deleted: set[int] = field(default_factory=set)
    retrieved: set[int] = field(default_factory=set)
    #: The client sent UTF8 (RFC 6856) in this session.
    utf8: bool = False
    close_requested: bool = False


#: ``on_command(state, line)``: return bytes to send them verbatim instead of the
#: normal answer (include the CRLF yourself), or None to let the server answer.
CommandHook = Callable[[SessionState, bytes], bytes | None]
